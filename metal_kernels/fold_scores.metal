// The draft's attention probabilities folded into its running score row for one layer: for every
// unit (a KV head's query heads, or one query head) and position, the max (MAX) or the sum of
// exp(logit - lse) over the unit's query rows, combined with the row so far the same way.
// Body of an mx.fast.metal_kernel; one thread per (position, unit).
const int pos = thread_position_in_grid.x;
const int unit = thread_position_in_grid.y;
const int n = params[0], heads = params[1], units = params[2], length = params[3];
const int unit_rows = heads / units * n;  // query rows are head-major, a unit's heads consecutive
float folded = 0.0f;
for (int r = 0; r < unit_rows; r++) {
  const int row = unit * unit_rows + r;
  const float probability = exp(logits[size_t(row) * length + pos] - lse[row]);
  folded = MAX ? max(folded, probability) : folded + probability;
}
const float before = live[size_t(unit) * length + pos];
scores[size_t(unit) * length + pos] = MAX ? max(before, folded) : before + folded;
