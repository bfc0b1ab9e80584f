// The splits' partial outputs of split_attention.metal combined by their log-sum-exp:
// out = sum_s w_s o_s, w_s = exp(lse_s - lse). Body of an mx.fast.metal_kernel; template: T (output
// dtype), D (head_dim). One thread per (query row, dim); every thread of a row recomputes the same
// weights, which costs a few reads of lse_part (parts is at most a few dozen) and needs no barrier.
const int d = thread_position_in_grid.x;
const int row = thread_position_in_grid.y;
const int parts = params[0], rows = params[1];
const float neg_inf = Limits<float>::min;
float top = neg_inf;
for (int s = 0; s < parts; s++) {
  top = max(top, lse_part[s * rows + row]);
}
float total = 0.0f, value = 0.0f;
for (int s = 0; s < parts; s++) {
  const float part_lse = lse_part[s * rows + row];
  if (part_lse != neg_inf) {
    const float weight = exp(part_lse - top);
    total += weight;
    value += weight * o_part[(size_t(s) * rows + row) * D + d];
  }
}
out[row * D + d] = static_cast<T>(value / total);
if (d == 0) {
  lse[row] = top + log(total);
}
