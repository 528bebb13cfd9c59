/* One decode step's attention for a left-padded batch: each row attends to its own columns only.
 *
 * Row r's query heads attend to columns [starts[r], columns) of its keys and values. Everything a row
 * computes is written out in a fixed order over its own columns, counted from its first one (scores,
 * their maximum, the softmax sum, the weighted values), and the build forbids reassociation and
 * contraction (no -ffast-math, -ffp-contract=off): whatever the compiler vectorises, a row's results
 * are bitwise those it gets alone, with no padding, at any position in any batch.
 *
 * Two ways to compute the same thing, picked by the shapes alone (so a model always takes the same):
 * vectors of 16 lanes when head_dim is a multiple of 16 and a key/value head serves at most 8 query
 * heads (a key's 16 columns at a time, each column's lanes added in one fixed tree), else plain loops.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16
#define MAX_VECTORS 16 /* head_dim up to 256 on the vector path */
#define MAX_GROUP 8    /* query heads per key/value head on the vector path */

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

typedef struct {
    const float *q, *k, *v; /* q, out: [rows, heads, head_dim]; k, v: strided, head_dim contiguous */
    float *out, *scratch;   /* scratch: heads / kv_heads * columns floats */
    const int64_t *starts;
    int64_t rows, heads, kv_heads, columns, head_dim, k_row, k_head, k_col, v_row, v_head, v_col;
    float scale;
} Batch;

/* scores s[start:columns] -> softmax weights, in place */
static void softmax(float *s, int64_t start, int64_t columns) {
    float top = -INFINITY, sum = 0.0f;
    for (int64_t j = start; j < columns; j++) top = s[j] > top ? s[j] : top;
    for (int64_t j = start; j < columns; j++) {
        s[j] = expf(s[j] - top);
        sum += s[j];
    }
    for (int64_t j = start; j < columns; j++) s[j] /= sum;
}

static float dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[d + l] * b[d + l];
    for (int half = LANES / 2; half > 0; half /= 2)
        for (int l = 0; l < half; l++) acc[l] += acc[l + half];
    float total = acc[0];
    for (; d < n; d++) total += a[d] * b[d];
    return total;
}

/* row r, key/value head g, plain loops */
static void scalar_group(const Batch *b, int64_t r, int64_t g) {
    int64_t group = b->heads / b->kv_heads, start = b->starts[r], columns = b->columns, head_dim = b->head_dim;
    const float *keys = b->k + r * b->k_row + g * b->k_head, *values = b->v + r * b->v_row + g * b->v_head;
    const float *queries = b->q + (r * b->heads + g * group) * head_dim;
    float *outs = b->out + (r * b->heads + g * group) * head_dim;
    for (int64_t j = start; j < columns; j++) /* each key read once for the group's heads */
        for (int64_t h = 0; h < group; h++)
            b->scratch[h * columns + j] = b->scale * dot(queries + h * head_dim, keys + j * b->k_col, head_dim);
    for (int64_t h = 0; h < group; h++) {
        softmax(b->scratch + h * columns, start, columns);
        for (int64_t d = 0; d < head_dim; d++) outs[h * head_dim + d] = 0.0f;
    }
    for (int64_t j = start; j < columns; j++) { /* each value read once for the group's heads */
        const float *value = values + j * b->v_col;
        for (int64_t h = 0; h < group; h++) {
            float w = b->scratch[h * columns + j], *o = outs + h * head_dim;
            for (int64_t d = 0; d < head_dim; d++) o[d] += w * value[d];
        }
    }
}

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Sixteen vectors, one per column with its partial sums in 16 lanes, to one vector of the sixteen
 * columns' sums (in order). Each column's lanes are added in the same tree: l + (l + 8), then + 4, + 2, + 1. */
#define PAIRED(a, b, ...) (__builtin_shufflevector(a, b, __VA_ARGS__))
static inline vec column_sums(const vec a[LANES]) {
    vec h[8], q[4], e[2];
    for (int i = 0; i < 8; i++)
        h[i] = PAIRED(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               PAIRED(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        q[i] = PAIRED(h[2 * i], h[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               PAIRED(h[2 * i], h[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        e[i] = PAIRED(q[2 * i], q[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               PAIRED(q[2 * i], q[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return PAIRED(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           PAIRED(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* row r, key/value head g, in vectors: head_dim = nv * LANES (inlined with nv a constant for common sizes) */
static inline void vector_group(const Batch *b, int64_t nv, int64_t r, int64_t g) {
    int64_t group = b->heads / b->kv_heads, start = b->starts[r], columns = b->columns, head_dim = b->head_dim;
    const float *keys = b->k + r * b->k_row + g * b->k_head, *values = b->v + r * b->v_row + g * b->v_head;
    const float *queries = b->q + (r * b->heads + g * group) * head_dim;
    vec qv[MAX_GROUP][MAX_VECTORS], acc[MAX_GROUP][MAX_VECTORS];
    for (int64_t h = 0; h < group; h++)
        for (int64_t i = 0; i < nv; i++) qv[h][i] = load(queries + h * head_dim + i * LANES);
    for (int64_t block = start; block < columns; block += LANES) { /* 16 columns at a time, from the row's first */
        int64_t width = columns - block < LANES ? columns - block : LANES;
        for (int64_t h = 0; h < group; h++) {
            vec a[LANES];
            for (int64_t c = 0; c < LANES; c++) {
                a[c] = (vec){0};
                if (c >= width) continue;
                const float *key = keys + (block + c) * b->k_col;
                a[c] = qv[h][0] * load(key);
                for (int64_t i = 1; i < nv; i++) a[c] += qv[h][i] * load(key + i * LANES);
            }
            vec sums = column_sums(a) * b->scale;
            float lanes[LANES];
            memcpy(lanes, &sums, sizeof lanes);
            memcpy(b->scratch + h * columns + block, lanes, width * sizeof(float));
        }
    }
    for (int64_t h = 0; h < group; h++) {
        softmax(b->scratch + h * columns, start, columns);
        for (int64_t i = 0; i < nv; i++) acc[h][i] = (vec){0};
    }
    for (int64_t j = start; j < columns; j++) { /* each value read once for the group's heads */
        const float *value = values + j * b->v_col;
        vec vv[MAX_VECTORS];
        for (int64_t i = 0; i < nv; i++) vv[i] = load(value + i * LANES);
        for (int64_t h = 0; h < group; h++) {
            float w = b->scratch[h * columns + j];
            for (int64_t i = 0; i < nv; i++) acc[h][i] += w * vv[i];
        }
    }
    float *outs = b->out + (r * b->heads + g * group) * head_dim;
    for (int64_t h = 0; h < group; h++) memcpy(outs + h * head_dim, acc[h], head_dim * sizeof(float));
}

/* Returns 0, or 1 + the first row whose start is not one of the columns (nothing is computed then). */
int64_t guard_decode_attention(const float *q, const float *k, const float *v, float *out, float *scratch,
                               const int64_t *starts, int64_t rows, int64_t heads, int64_t kv_heads, int64_t columns,
                               int64_t head_dim, int64_t k_row, int64_t k_head, int64_t k_col, int64_t v_row,
                               int64_t v_head, int64_t v_col, float scale) {
    Batch b = {q, k, v, out, scratch, starts, rows, heads, kv_heads, columns, head_dim,
               k_row, k_head, k_col, v_row, v_head, v_col, scale};
    for (int64_t r = 0; r < rows; r++)
        if (starts[r] < 0 || starts[r] >= columns) return r + 1;
    int64_t nv = head_dim / LANES;
    int vectors = head_dim % LANES == 0 && nv <= MAX_VECTORS && heads / kv_heads <= MAX_GROUP;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < kv_heads; g++) {
            if (!vectors)
                scalar_group(&b, r, g);
            else if (nv == 4) /* head_dim 64, the default model's: the loops over vectors unrolled */
                vector_group(&b, 4, r, g);
            else if (nv == 8) /* head_dim 128 */
                vector_group(&b, 8, r, g);
            else
                vector_group(&b, nv, r, g);
        }
    return 0;
}
