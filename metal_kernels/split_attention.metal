// Attention of a block of queries over index lists (or the whole context), split along the rows.
// Body of an mx.fast.metal_kernel; template: T (cache dtype), D (head_dim), BN (simdgroups per
// threadgroup), DENSE (no lists: the rows are 0..start), SCORES (also write every logit).
//
// One threadgroup per (list, tile of the list's queries, split of its rows); grid y == splits is the
// block's own n rows, causally. A list serves list_heads consecutive query heads and all n queries;
// a tile holds up to 8 * BN of them, 8 per simdgroup. The threadgroup copies each chunk of its rows
// into threadgroup memory once and every simdgroup reads it from there for its own queries, so a
// gathered K/V row leaves device memory once per tile (once in all, for up to 8 * BN queries).
// Within a simdgroup the 32 lanes hold D/32 dims each, as MLX's sdpa_vector, and keep an online
// softmax per query; each simdgroup writes its queries' partial results, which
// merge_splits.metal folds over the splits.
constexpr int QMAX = 8;   // queries per simdgroup: their accumulators live in registers
constexpr int CHUNK = 16; // K/V rows per pass through threadgroup memory
constexpr int E = D / 32;
const int start = params[0], n = params[1], heads = params[2], kv_heads = params[3];
const int lists = params[4], splits = params[5], tiles = params[6], capacity = params[7];
const int length = start + n;
const int split = threadgroup_position_in_grid.y;
const int list = threadgroup_position_in_grid.z / tiles;
const int sg = simdgroup_index_in_threadgroup;
const int lane = thread_index_in_simdgroup;
const int tid = thread_index_in_threadgroup;
const int list_heads = heads / lists;
const int kv_head = list * list_heads / (heads / kv_heads);
// this simdgroup's queries, counted within the list (head-major: local head * n + t)
const int first_query = (threadgroup_position_in_grid.z % tiles) * QMAX * BN + sg * QMAX;
const int queries = max(0, min(QMAX, list_heads * n - first_query));
const int first_row = list * list_heads * n + first_query;  // in q and the outputs
const int rows = heads * n;
const float neg_inf = Limits<float>::min;

thread float query[QMAX][E];
thread float acc[QMAX][E];
thread float run_max[QMAX];
thread float run_sum[QMAX];
for (int j = 0; j < QMAX; j++) {
  for (int e = 0; e < E; e++) {
    query[j][e] = j < queries ? scale[0] * float(q[(first_row + j) * D + lane * E + e]) : 0.0f;
    acc[j][e] = 0.0f;
  }
  run_max[j] = neg_inf;
  run_sum[j] = 0.0f;
}

const bool block = split == splits;
int first = 0, last = n, list_start = 0;
if (!block) {
  const int count = DENSE ? start : offsets[list + 1] - offsets[list];
  const int chunk = (count + splits - 1) / splits;
  list_start = DENSE ? 0 : offsets[list];
  first = min(split * chunk, count);
  last = min(first + chunk, count);
}
const size_t head_base = size_t(kv_head) * capacity * D;

threadgroup float tg_keys[CHUNK * D];
threadgroup float tg_values[CHUNK * D];
for (int base = first; base < last; base += CHUNK) {
  const int rows_here = min(CHUNK, last - base);
  for (int index = tid; index < rows_here * D; index += BN * 32) {
    const int i = base + index / D;
    const int pos = block ? start + i : (DENSE ? i : indices[list_start + i]);
    tg_keys[index] = float(k[head_base + size_t(pos) * D + index % D]);
    tg_values[index] = float(v[head_base + size_t(pos) * D + index % D]);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int r = 0; r < rows_here; r++) {
    const int i = base + r;
    for (int j = 0; j < queries; j++) {
      float logit = 0.0f;
      for (int e = 0; e < E; e++) {
        logit += query[j][e] * tg_keys[r * D + lane * E + e];
      }
      logit = simd_sum(logit);
      const bool visible = !block || i <= (first_query + j) % n;
      if (SCORES && lane == 0) {
        const int pos = block ? start + i : i;  // scores come from the dense variant
        logits[size_t(first_row + j) * length + pos] = visible ? logit : neg_inf;
      }
      if (visible) {
        const float new_max = max(run_max[j], logit);
        const float factor = exp(run_max[j] - new_max);  // exp(-inf) = 0 for the first row
        const float weight = exp(logit - new_max);
        run_sum[j] = run_sum[j] * factor + weight;
        for (int e = 0; e < E; e++) {
          acc[j][e] = acc[j][e] * factor + weight * tg_values[r * D + lane * E + e];
        }
        run_max[j] = new_max;
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // the next chunk overwrites these rows
}

for (int j = 0; j < queries; j++) {
  const size_t part = size_t(split) * rows + first_row + j;
  for (int e = 0; e < E; e++) {
    o_part[part * D + lane * E + e] = run_sum[j] > 0.0f ? acc[j][e] / run_sum[j] : 0.0f;
  }
  if (lane == 0) {
    lse_part[part] = run_sum[j] > 0.0f ? run_max[j] + log(run_sum[j]) : neg_inf;
  }
}
