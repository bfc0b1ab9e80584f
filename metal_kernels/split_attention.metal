// Attention of a block of queries over index lists (or the whole context), split along the rows.
// Body of an mx.fast.metal_kernel; template: T (cache dtype), D (head_dim), BN (simdgroups per
// threadgroup), DENSE (no lists: the rows are 0..start), SCORES (also write every logit).
//
// One threadgroup per (list, tile of the list's queries, split of its rows); grid y == splits is the
// block's own n rows, causally. A list serves list_heads consecutive query heads and all n queries,
// packed into one tile, so each gathered K/V row is read once per tile and used by every query.
// Each simdgroup takes every BN-th row of the split, its 32 lanes holding D/32 dims each (as MLX's
// sdpa_vector), and keeps a running max and sum per query (online softmax); the simdgroups' partial
// results are then combined through threadgroup memory. merge_splits.metal folds the splits.
constexpr int QMAX = 8;  // queries per tile: their accumulators live in registers
constexpr int E = D / 32;
const int start = params[0], n = params[1], heads = params[2], kv_heads = params[3];
const int lists = params[4], splits = params[5], tiles = params[6], capacity = params[7];
const int length = start + n;
const int split = threadgroup_position_in_grid.y;
const int list = threadgroup_position_in_grid.z / tiles;
const int first_query = (threadgroup_position_in_grid.z % tiles) * QMAX;
const int sg = simdgroup_index_in_threadgroup;
const int lane = thread_index_in_simdgroup;
const int list_heads = heads / lists;
const int kv_head = list * list_heads / (heads / kv_heads);
const int queries = min(QMAX, list_heads * n - first_query);
const int first_row = list * list_heads * n + first_query;  // query rows are head-major: head * n + t
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
const device T* keys = k + size_t(kv_head) * capacity * D + lane * E;
const device T* values = v + size_t(kv_head) * capacity * D + lane * E;

for (int i = first + sg; i < last; i += BN) {
  const int pos = block ? start + i : (DENSE ? i : indices[list_start + i]);
  thread float key[E];
  thread float value[E];
  for (int e = 0; e < E; e++) {
    key[e] = float(keys[size_t(pos) * D + e]);
    value[e] = float(values[size_t(pos) * D + e]);
  }
  for (int j = 0; j < queries; j++) {
    float logit = 0.0f;
    for (int e = 0; e < E; e++) {
      logit += query[j][e] * key[e];
    }
    logit = simd_sum(logit);
    const bool visible = !block || i <= (first_query + j) % n;
    if (SCORES && lane == 0) {
      logits[size_t(first_row + j) * length + pos] = visible ? logit : neg_inf;
    }
    if (visible) {
      const float new_max = max(run_max[j], logit);
      const float factor = exp(run_max[j] - new_max);  // exp(-inf) = 0 for the first row
      const float weight = exp(logit - new_max);
      run_sum[j] = run_sum[j] * factor + weight;
      for (int e = 0; e < E; e++) {
        acc[j][e] = acc[j][e] * factor + weight * value[e];
      }
      run_max[j] = new_max;
    }
  }
}

// Combine the simdgroups: rescale each one's accumulators to the threadgroup's max, then sum.
threadgroup float tg_max[BN * QMAX];
threadgroup float tg_sum[BN * QMAX];
threadgroup float tg_acc[BN * D];
if (lane == 0) {
  for (int j = 0; j < QMAX; j++) {
    tg_max[sg * QMAX + j] = run_max[j];
    tg_sum[sg * QMAX + j] = run_sum[j];
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
const int tid = thread_index_in_threadgroup;
for (int j = 0; j < queries; j++) {
  float top = neg_inf;
  for (int g = 0; g < BN; g++) {
    top = max(top, tg_max[g * QMAX + j]);
  }
  float total = 0.0f;
  for (int g = 0; g < BN; g++) {
    total += tg_max[g * QMAX + j] == neg_inf ? 0.0f : tg_sum[g * QMAX + j] * exp(tg_max[g * QMAX + j] - top);
  }
  const float own = run_max[j] == neg_inf ? 0.0f : exp(run_max[j] - top);
  for (int e = 0; e < E; e++) {
    tg_acc[sg * D + lane * E + e] = acc[j][e] * own;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const size_t part = size_t(split) * rows + first_row + j;
  for (int d = tid; d < D; d += BN * 32) {
    float out = 0.0f;
    for (int g = 0; g < BN; g++) {
      out += tg_acc[g * D + d];
    }
    o_part[part * D + d] = total > 0.0f ? out / total : 0.0f;
  }
  if (tid == 0) {
    lse_part[part] = total > 0.0f ? top + log(total) : neg_inf;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
