/* The GNN's message passing for small requests, without torch's per-operator dispatch.
 *
 * triton/model.py hands the SAGEConv weights of a model version to sage_edge_features through
 * ctypes; fraudlib.model_export compiles this file into each version directory as libsage.so.
 * On a one-transaction request torch took 0.24 ms (p50, caches gone cold between calls as in
 * serving) for about 57 operators on a few dozen numbers each (docs/benchmarks.md).
 *
 * Per hop, what fraudlib/gnn.py's _sage_embed computes (dropout off): for the user->merchant conv
 * and the merchant->user conv, the sum of the neighbours' rows in edge order divided by the
 * degree (at least 1), then lin_l (with bias) of that mean plus lin_r of the node's own row, then
 * relu. The sums of the Linear layers may run in another order than torch's BLAS, so the result
 * can differ in the last bits: model.py checks at every load that it stays within a tight
 * tolerance of torch on probe graphs, and serves with torch when not.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  int32_t n_hops;
  int32_t hidden;
  int32_t user_dim;
  int32_t merchant_dim;
  /* 6 per hop: the user->merchant conv's lin_l weight [hidden, in_user] (row-major, as torch
   * stores it), lin_l bias [hidden], lin_r weight [hidden, in_merchant], then the
   * merchant->user conv's lin_l weight [hidden, in_merchant], bias, lin_r weight [hidden, in_user]. */
  const float *const *weights;
} sage_t;

/* out[d] = b + W_l (sum of x_src[src[e]] over edges e ending at d) / degree[d] + W_r x_dst[d] */
static void conv(const float *x_src, int32_t src_dim, const float *x_dst, int32_t dst_dim, int64_t n_dst,
                 const int64_t *src, const int64_t *dst, int64_t n_edges, const float *degree,
                 const float *w_l, const float *b_l, const float *w_r, int32_t hidden, float *mean, float *out) {
  memset(mean, 0, sizeof(float) * n_dst * src_dim);
  for (int64_t e = 0; e < n_edges; ++e) {
    const float *row = x_src + src[e] * src_dim;
    float *sum = mean + dst[e] * src_dim;
    for (int32_t k = 0; k < src_dim; ++k) sum[k] += row[k];
  }
  for (int64_t d = 0; d < n_dst; ++d) {
    float *m = mean + d * src_dim;
    const float *x = x_dst + d * dst_dim;
    for (int32_t k = 0; k < src_dim; ++k) m[k] /= degree[d];
    for (int32_t o = 0; o < hidden; ++o) {
      float left = b_l[o], right = 0.0f;
      for (int32_t k = 0; k < src_dim; ++k) left += m[k] * w_l[o * src_dim + k];
      for (int32_t k = 0; k < dst_dim; ++k) right += x[k] * w_r[o * dst_dim + k];
      out[d * hidden + o] = left + right;
    }
  }
}

static void relu(float *x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

/* Each edge's XGBoost input [x_user | h_user | x_merchant | h_merchant | edge_attr] into out
 * [n_edges, user_dim + merchant_dim + 2 hidden + edge_dim]. Node ids must be in range (model.py
 * checks the request first). Returns 0, or -1 when memory runs out. */
int sage_edge_features(const sage_t *m, const float *x_user, int64_t n_users, const float *x_merchant,
                       int64_t n_merchants, const int64_t *users, const int64_t *merchants, int64_t n_edges,
                       const float *edge_attr, int32_t edge_dim, float *out) {
  int32_t h = m->hidden, widest = m->user_dim > m->merchant_dim ? m->user_dim : m->merchant_dim;
  widest = widest > h ? widest : h;
  int64_t n_nodes = n_users + n_merchants;
  int64_t most = n_users > n_merchants ? n_users : n_merchants;
  /* degrees, then the current and the next embeddings of every node, then one conv's means */
  float *buffer = malloc(sizeof(float) * (n_nodes * (1 + 2 * (int64_t)h) + most * widest + 1));
  if (buffer == NULL) return -1;
  float *user_degree = buffer, *merchant_degree = user_degree + n_users;
  float *h_user = merchant_degree + n_merchants, *h_merchant = h_user + n_users * h;
  float *next_user = h_merchant + n_merchants * h, *next_merchant = next_user + n_users * h;
  float *mean = next_merchant + n_merchants * h;
  for (int64_t i = 0; i < n_nodes; ++i) buffer[i] = 0.0f;
  for (int64_t e = 0; e < n_edges; ++e) {
    user_degree[users[e]] += 1.0f;
    merchant_degree[merchants[e]] += 1.0f;
  }
  for (int64_t i = 0; i < n_nodes; ++i) buffer[i] = buffer[i] < 1.0f ? 1.0f : buffer[i];

  const float *xu = x_user, *xm = x_merchant;
  int32_t du = m->user_dim, dm = m->merchant_dim;
  for (int32_t hop = 0; hop < m->n_hops; ++hop) {
    const float *const *w = m->weights + 6 * hop;
    conv(xu, du, xm, dm, n_merchants, users, merchants, n_edges, merchant_degree, w[0], w[1], w[2], h, mean,
         next_merchant);
    conv(xm, dm, xu, du, n_users, merchants, users, n_edges, user_degree, w[3], w[4], w[5], h, mean, next_user);
    relu(next_user, n_users * h);
    relu(next_merchant, n_merchants * h);
    float *swap = h_user; h_user = next_user; next_user = swap;
    swap = h_merchant; h_merchant = next_merchant; next_merchant = swap;
    xu = h_user; xm = h_merchant; du = dm = h;
  }

  int64_t width = m->user_dim + m->merchant_dim + 2 * (int64_t)h + edge_dim;
  for (int64_t e = 0; e < n_edges; ++e) {
    float *row = out + e * width;
    memcpy(row, x_user + users[e] * m->user_dim, sizeof(float) * m->user_dim);
    row += m->user_dim;
    memcpy(row, h_user + users[e] * h, sizeof(float) * h);
    row += h;
    memcpy(row, x_merchant + merchants[e] * m->merchant_dim, sizeof(float) * m->merchant_dim);
    row += m->merchant_dim;
    memcpy(row, h_merchant + merchants[e] * h, sizeof(float) * h);
    row += h;
    memcpy(row, edge_attr + e * edge_dim, sizeof(float) * edge_dim);
  }
  free(buffer);
  return 0;
}
