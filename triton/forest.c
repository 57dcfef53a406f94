/* The XGBoost trees of a model version, evaluated without XGBoost's per-call machinery.
 *
 * triton/model.py flattens the booster's trees (embedding_based_xgboost.json) into the arrays
 * of a forest_t and calls forest_predict through ctypes; fraudlib.model_export compiles this
 * file into each version directory as libforest.so. One transaction took 0.38 ms (p50) in
 * XGBoosterPredictFromDense with caches gone cold between calls, as in serving, and 0.09 ms
 * here (docs/benchmarks.md).
 *
 * It computes what XGBoost's CPU predictor computes, in the same float32 operations and
 * order: the base margin, plus each tree's leaf in tree order, then binary:logistic's sigmoid as
 * xgboost/src/common/math.h writes it. A node goes left when the feature is below its threshold, or when the
 * feature is missing (NaN) and its default direction is left. model.py checks at every load
 * that the result equals XGBoost's bit for bit on probe rows, and serves with XGBoost when not.
 */
#include <math.h>
#include <stdint.h>

typedef struct {
  int32_t n_trees;
  int32_t n_features;
  float base_margin;
  const int32_t *roots;   /* [n_trees] index of each tree's root in the node arrays */
  const int32_t *feature; /* per node: the feature it splits on */
  const float *value;     /* per node: the split threshold, or the leaf's value */
  const int32_t *left;    /* per node: the left child, -1 for a leaf */
  const int32_t *right;   /* per node: the right child */
  const uint8_t *default_left;
} forest_t;

/* out[r] for each row of the row-major float32 matrix x [rows, forest->n_features]. */
void forest_predict(const forest_t *forest, const float *x, int64_t rows, float *out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *row = x + r * forest->n_features;
    float sum = forest->base_margin;
    for (int32_t t = 0; t < forest->n_trees; ++t) {
      int32_t n = forest->roots[t];
      while (forest->left[n] >= 0) {
        float v = row[forest->feature[n]];
        int go_left = isnan(v) ? forest->default_left[n] : v < forest->value[n];
        n = go_left ? forest->left[n] : forest->right[n];
      }
      sum += forest->value[n];
    }
    /* binary:logistic's probability: xgboost::common::Sigmoid(float), term by term */
    float z = -sum;
    z = 88.7f < z ? 88.7f : z; /* std::min(-x, 88.7f): no overflow in expf */
    out[r] = 1.0f / (expf(z) + 1.0f + 1e-16f);
  }
}
