/*
 * kernels_tasks.h: the bodies of the kernels' tasks, compiled once per instruction set: a file of
 * compute/ per level defines LLM_TASK(name) (the name at that level) and LLM_TASKS (its table),
 * sets its target and includes this. The loops are plain C written to vectorise (independent
 * lanes for reductions, no -ffast-math), so each level is the same source, vectorised for it.
 */

static void
LLM_TASK(dropout_task)(void *arg, size_t start, size_t end)
{
	DropoutArgs *a = arg;
	uint32_t	threshold = dropout_threshold(a->p);
	float		scale = 1.0f / (1.0f - a->p);

	for (size_t i = start; i < end; i++)
		a->x[i] = dropout_keep(a->key, i, threshold) ? a->x[i] * scale : 0.0f;
}

static void
LLM_TASK(encoder_forward_task)(void *arg, size_t start, size_t end)
{
	EncoderArgs *a = arg;
	size_t		C = a->C;

	for (size_t bt = start; bt < end; bt++)
	{
		const float *wte = a->wte + (size_t) a->inp[bt] * C;
		const float *wpe = a->wpe + (bt % a->T) * C;
		float	   *out = a->out + bt * C;

		for (size_t i = 0; i < C; i++)
			out[i] = wte[i] + wpe[i];
	}
}

/* Over channel ranges: a token may repeat within the batch, so rows would race on dwte. */
static void
LLM_TASK(encoder_backward_task)(void *arg, size_t start, size_t end)
{
	EncoderArgs *a = arg;
	size_t		C = a->C;

	for (size_t bt = 0; bt < (size_t) a->B * a->T; bt++)
	{
		float	   *dwte = a->dwte + (size_t) a->inp[bt] * C;
		float	   *dwpe = a->dwpe + (bt % a->T) * C;
		const float *dout = a->dout + bt * C;

		for (size_t i = start; i < end; i++)
		{
			dwte[i] += dout[i];
			dwpe[i] += dout[i];
		}
	}
}

static void
LLM_TASK(layernorm_forward_task)(void *arg, size_t start, size_t end)
{
	LayernormArgs *a = arg;
	size_t		C = a->C;
	const float *restrict w = a->weight;
	const float *restrict b = a->bias;

	for (size_t r = start; r < end; r++)
	{
		const float *restrict x = a->inp + r * C;
		float	   *restrict out = a->out + r * C;
		float		m = llm_sum(x, C) / (float) C;
		float		acc[16] = {0};
		float		var = 0.0f,
					s;
		size_t		i = 0;

		for (; i + 16 <= C; i += 16)
			for (int k = 0; k < 16; k++)
				acc[k] += (x[i + k] - m) * (x[i + k] - m);
		for (; i < C; i++)
			var += (x[i] - m) * (x[i] - m);
		for (int k = 0; k < 16; k++)
			var += acc[k];
		s = 1.0f / sqrtf(var / (float) C + LAYERNORM_EPS);
		for (i = 0; i < C; i++)
			out[i] = (x[i] - m) * s * w[i] + b[i];
		if (a->mean != NULL)
		{
			a->mean[r] = m;
			a->rstd[r] = s;
		}
	}
}

/* dinp by rows. */
static void
LLM_TASK(layernorm_backward_rows)(void *arg, size_t start, size_t end)
{
	LayernormArgs *a = arg;
	size_t		C = a->C;

	for (size_t r = start; r < end; r++)
	{
		const float *x = a->inp + r * C;
		const float *dout = a->dout + r * C;
		float	   *dinp = a->dinp + r * C;
		float		m = a->cmean[r],
					s = a->crstd[r];
		float		acc1[LANES] = {0},
					acc2[LANES] = {0};
		float		dnorm_mean = 0.0f,
					dnorm_norm_mean = 0.0f;
		size_t		i = 0;

		for (; i + LANES <= C; i += LANES)
			for (int j = 0; j < LANES; j++)
			{
				float		dnorm = a->weight[i + j] * dout[i + j];

				acc1[j] += dnorm;
				acc2[j] += dnorm * (x[i + j] - m) * s;
			}
		for (int j = 0; j < LANES; j++)
			dnorm_mean += acc1[j], dnorm_norm_mean += acc2[j];
		for (; i < C; i++)
		{
			float		dnorm = a->weight[i] * dout[i];

			dnorm_mean += dnorm;
			dnorm_norm_mean += dnorm * (x[i] - m) * s;
		}
		dnorm_mean /= C;
		dnorm_norm_mean /= C;
		for (i = 0; i < C; i++)
		{
			float		norm = (x[i] - m) * s;

			dinp[i] += (a->weight[i] * dout[i] - dnorm_mean - norm * dnorm_norm_mean) * s;
		}
	}
}

/* dweight and dbias by channel ranges, summing over rows. */
static void
LLM_TASK(layernorm_backward_cols)(void *arg, size_t start, size_t end)
{
	LayernormArgs *a = arg;
	size_t		C = a->C;

	if (!a->accumulate)
		for (size_t i = start; i < end; i++)
			a->dweight[i] = a->dbias[i] = 0.0f;
	for (size_t r = 0; r < (size_t) a->BT; r++)
	{
		const float *x = a->inp + r * C;
		const float *dout = a->dout + r * C;
		float		m = a->cmean[r],
					s = a->crstd[r];

		for (size_t i = start; i < end; i++)
		{
			a->dweight[i] += (x[i] - m) * s * dout[i];
			a->dbias[i] += dout[i];
		}
	}
}

/*
 * One task = one (batch, head) pair: its rows of att and its slice of out are its own.
 * The scores of row t, q_t . k_t2 for every t2 <= t, are computed as hs vectorised row updates
 * over a transposed copy of the head's keys (scratch), not as t+1 short dot products.
 */
static void
LLM_TASK(attention_forward_task)(void *arg, size_t start, size_t end)
{
	AttentionArgs *a = arg;
	size_t		T = a->T,
				C = a->C,
				C3 = 3 * C;
	int			hs = a->C / a->NH;
	float		scale = 1.0f / sqrtf((float) hs);
	uint32_t	threshold = dropout_threshold(a->dropout);
	float		keep_scale = 1.0f / (1.0f - a->dropout);

	for (size_t bh = start; bh < end; bh++)
	{
		size_t		b = bh / a->NH,
					h = bh % a->NH;
		const float *base = a->inp + b * T * C3 + h * hs;
		float	   *kt = a->scratch + bh * (hs + 1) * T;	/* (hs, T) */

		for (size_t t2 = 0; t2 < T; t2++)
			for (int i = 0; i < hs; i++)
				kt[i * T + t2] = base[t2 * C3 + C + i];

		for (size_t t = 0; t < T; t++)
		{
			const float *q = base + t * C3;
			float	   *att = a->att + (bh * T + t) * T;
			float	   *out = a->out + (b * T + t) * C + h * hs;
			size_t		n = t + 1;

			memset(att, 0, T * sizeof(float));
			for (int i = 0; i < hs; i++)
			{
				const float *k = kt + i * T;
				float		qi = q[i] * scale;

				for (size_t t2 = 0; t2 < n; t2++)
					att[t2] += qi * k[t2];
			}
			softmax_inplace(att, n);

			memset(out, 0, hs * sizeof(float));
			for (size_t t2 = 0; t2 < n; t2++)
			{
				const float *v = base + t2 * C3 + 2 * C;
				float		w = att[t2];

				if (a->dropout > 0.0f)
					w = dropout_keep(a->key, (bh * T + t) * T + t2, threshold) ? w * keep_scale : 0.0f;
				for (int i = 0; i < hs; i++)
					out[i] += w * v[i];
			}
		}
	}
}

static void
LLM_TASK(attention_backward_task)(void *arg, size_t start, size_t end)
{
	AttentionArgs *a = arg;
	size_t		T = a->T,
				C = a->C,
				C3 = 3 * C;
	int			hs = a->C / a->NH;
	float		scale = 1.0f / sqrtf((float) hs);
	uint32_t	threshold = dropout_threshold(a->dropout);
	float		keep_scale = 1.0f / (1.0f - a->dropout);

	for (size_t bh = start; bh < end; bh++)
	{
		size_t		b = bh / a->NH,
					h = bh % a->NH;
		const float *base = a->inp + b * T * C3 + h * hs;
		float	   *dbase = a->dinp + b * T * C3 + h * hs;
		float	   *vt = a->scratch + bh * (hs + 1) * T;	/* (hs, T) */
		float	   *datt = vt + hs * T; /* (T) */

		for (size_t t2 = 0; t2 < T; t2++)
		{
			for (int i = 0; i < hs; i++)
				vt[i * T + t2] = base[t2 * C3 + 2 * C + i];
			for (int k = 0; k < 3; k++)
				memset(dbase + t2 * C3 + k * C, 0, hs * sizeof(float));
		}

		for (size_t t = 0; t < T; t++)
		{
			const float *q = base + t * C3;
			float	   *dq = dbase + t * C3;
			const float *dout = a->dout + (b * T + t) * C + h * hs;
			const float *att = a->catt + (bh * T + t) * T;
			size_t		n = t + 1;
			float		s = 0.0f;

			/* through out = dropout(att) @ v: datt = dout . v, dv += att * dout */
			memset(datt, 0, n * sizeof(float));
			for (int i = 0; i < hs; i++)
			{
				const float *v = vt + i * T;
				float		d = dout[i];

				for (size_t t2 = 0; t2 < n; t2++)
					datt[t2] += d * v[t2];
			}
			for (size_t t2 = 0; t2 < n; t2++)
			{
				float	   *dv = dbase + t2 * C3 + 2 * C;
				float		w = att[t2];

				if (a->dropout > 0.0f)
				{
					float		mask = dropout_keep(a->key, (bh * T + t) * T + t2, threshold) ? keep_scale : 0.0f;

					datt[t2] *= mask;
					w *= mask;
				}
				for (int i = 0; i < hs; i++)
					dv[i] += w * dout[i];
			}
			/* through the softmax and the scaled q.k */
			for (size_t t2 = 0; t2 < n; t2++)
				s += att[t2] * datt[t2];
			for (size_t t2 = 0; t2 < n; t2++)
			{
				const float *k = base + t2 * C3 + C;
				float	   *dk = dbase + t2 * C3 + C;
				float		dpre = att[t2] * (datt[t2] - s) * scale;

				for (int i = 0; i < hs; i++)
				{
					dq[i] += dpre * k[i];
					dk[i] += dpre * q[i];
				}
			}
		}
	}
}

/*
 * The element-wise loops read and write through local restrict pointers, in place or not: through
 * the argument struct, every store could change the struct's pointers (PostgreSQL builds with
 * -fno-strict-aliasing), and the loops would not vectorise.
 */
static void
LLM_TASK(gelu_forward_task)(void *arg, size_t start, size_t end)
{
	EltwiseArgs *a = arg;

	if (a->out == a->inp)
	{
		float	   *restrict x = a->out;

		for (size_t i = start; i < end; i++)
			x[i] = gelu(x[i]);
	}
	else
	{
		float	   *restrict out = a->out;
		const float *restrict inp = a->inp;

		for (size_t i = start; i < end; i++)
			out[i] = gelu(inp[i]);
	}
}

static void
LLM_TASK(gelu_backward_task)(void *arg, size_t start, size_t end)
{
	EltwiseArgs *a = arg;
	const float *restrict inp = a->inp;

	if (a->out == a->inp2)
	{
		float	   *restrict d = a->out;

		for (size_t i = start; i < end; i++)
			d[i] = d[i] * gelu_grad(inp[i]);
	}
	else
	{
		float	   *restrict out = a->out;
		const float *restrict dout = a->inp2;

		for (size_t i = start; i < end; i++)
			out[i] = dout[i] * gelu_grad(inp[i]);
	}
}

static void
LLM_TASK(residual_task)(void *arg, size_t start, size_t end)
{
	EltwiseArgs *a = arg;

	for (size_t i = start; i < end; i++)
		a->out[i] = a->inp[i] + a->inp2[i];
}

static void
LLM_TASK(crossentropy_task)(void *arg, size_t start, size_t end)
{
	CrossentropyArgs *a = arg;
	size_t		V = a->V;

	for (size_t r = start; r < end; r++)
	{
		float	   *x = a->logits + r * V;
		int32_t		target = a->targets[r];
		float		target_logit = x[target];
		float		maxval = llm_max(x, V);
		float		total,
					scale;

		for (size_t i = 0; i < V; i++)
			x[i] = llm_expf(x[i] - maxval);
		total = llm_sum(x, V);
		a->losses[r] = logf(total) + maxval - target_logit;
		scale = a->dloss / total;
		for (size_t i = 0; i < V; i++)
			x[i] *= scale;
		x[target] -= a->dloss;
	}
}

/* Fixed chunk boundaries, so the sum does not depend on the number of threads. */
static void
LLM_TASK(norm_task)(void *arg, size_t start, size_t end)
{
	NormArgs   *a = arg;

	for (size_t c = start; c < end; c++)
	{
		size_t		lo = a->N * c / NORM_CHUNKS,
					hi = a->N * (c + 1) / NORM_CHUNKS;
		double		total = 0.0;

		for (size_t b = lo; b < hi; b += NORM_BLOCK)
		{
			size_t		n = Min(NORM_BLOCK, hi - b);
			float		acc[LANES] = {0};
			size_t		i = 0;

			for (; i + LANES <= n; i += LANES)
				for (int j = 0; j < LANES; j++)
					acc[j] += a->x[b + i + j] * a->x[b + i + j];
			for (; i < n; i++)
				acc[0] += a->x[b + i] * a->x[b + i];
			for (int j = 0; j < LANES; j++)
				total += acc[j];
		}
		a->partial[c] = total;
	}
}

/* One pass over memory; the operation order follows torch.optim.AdamW (foreach). */
static void
LLM_TASK(adamw_task)(void *arg, size_t start, size_t end)
{
	AdamwArgs  *a = arg;
	float	   *restrict params = a->params;
	float	   *restrict ms = a->m;
	float	   *restrict vs = a->v;
	const float *restrict grads = a->grads;
	float		beta2 = a->beta2,
				w1 = 1.0f - a->beta1,
				w2 = 1.0f - a->beta2,
				eps = a->eps,
				step_size = a->step_size,
				bc2_sqrt = a->bc2_sqrt,
				decay = a->decay,
				grad_scale = a->grad_scale;

	for (size_t i = start; i < end; i++)
	{
		float		g = grads[i] * grad_scale;
		float		m = ms[i] + w1 * (g - ms[i]);
		float		v = vs[i] * beta2 + w2 * (g * g);
		float		denom = sqrtf(v) / bc2_sqrt + eps;

		ms[i] = m;
		vs[i] = v;
		params[i] = params[i] * decay - step_size * (m / denom);
	}
}

static void
LLM_TASK(bias_fill_task)(void *arg, size_t start, size_t end)
{
	BiasArgs   *a = arg;

	for (size_t r = start; r < end; r++)
		memcpy(a->out + r * a->OC, a->bias, a->OC * sizeof(float));
}

/* out(OC) = column sums of dout(BT,OC), by column ranges. */
static void
LLM_TASK(bias_backward_task)(void *arg, size_t start, size_t end)
{
	BiasArgs   *a = arg;

	if (!a->accumulate)
		memset(a->out + start, 0, (end - start) * sizeof(float));
	for (size_t r = 0; r < (size_t) a->BT; r++)
	{
		const float *d = a->dout + r * a->OC;

		for (size_t i = start; i < end; i++)
			a->out[i] += d[i];
	}
}

static void
LLM_TASK(attention_prompt_head)(float *out, size_t ld_out, const float *q, size_t ld_q, const float *k,
								const float *v, size_t ld_kv, size_t T, size_t r0, size_t hs, size_t block, float scale,
								float *S)
{
	for (size_t b0 = r0; b0 < T; b0 += block)
	{
		size_t		b1 = Min(b0 + block, T);
		size_t		M = b1 - b0;
		size_t		N = b1;			/* keys 0 .. b1-1 */

		llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, LlmCblasTrans, (int) M, (int) N, (int) hs,
						scale, q + b0 * ld_q, (int) ld_q, k, (int) ld_kv, 0.0f, S, (int) N);
		for (size_t i = 0; i < M; i++)
		{
			float	   *row = S + i * N;
			size_t		n = b0 + i + 1; /* causal: keys 0 .. b0+i */

			softmax_inplace(row, n);
			memset(row + n, 0, (N - n) * sizeof(float));
		}
		llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, LlmCblasNoTrans, (int) M, (int) hs, (int) N,
						1.0f, S, (int) N, v, (int) ld_kv, 0.0f, out + b0 * ld_out, (int) ld_out);
	}
}

static void
LLM_TASK(attention_step_row)(float *out, float *p, size_t stride, const float *q, const float *const *keys,
							 const float *const *values, size_t n, size_t h0, size_t h1, size_t hs, float scale)
{
	for (size_t t = 0; t < n; t++)
		for (size_t h = h0; h < h1; h++)
			p[h * stride + t] = llm_dot(q + h * hs, keys[t] + h * hs, hs) * scale;
	for (size_t h = h0; h < h1; h++)
	{
		softmax_inplace(p + h * stride, n);
		memset(out + h * hs, 0, hs * sizeof(float));
	}
	for (size_t t = 0; t < n; t++)
	{
		const float *v = values[t];

		for (size_t h = h0; h < h1; h++)
		{
			float		pt = p[h * stride + t];

			for (size_t c = 0; c < hs; c++)
				out[h * hs + c] += pt * v[h * hs + c];
		}
	}
}

static size_t
LLM_TASK(first_nonfinite)(const float *x, size_t n)
{
	const uint32_t *u = (const uint32_t *) x;

	for (size_t start = 0; start < n; start += 4096)
	{
		size_t		end = Min(start + 4096, n);
		uint32_t	bad = 0;

		for (size_t i = start; i < end; i++)
			bad |= ((u[i] & 0x7f800000u) == 0x7f800000u);
		if (bad)
			for (size_t i = start; i < end; i++)
				if ((u[i] & 0x7f800000u) == 0x7f800000u)
					return i;
	}
	return n;
}

const LlmKernelTasks LLM_TASKS = {
	.dropout_task = LLM_TASK(dropout_task),
	.encoder_forward_task = LLM_TASK(encoder_forward_task),
	.encoder_backward_task = LLM_TASK(encoder_backward_task),
	.layernorm_forward_task = LLM_TASK(layernorm_forward_task),
	.layernorm_backward_rows = LLM_TASK(layernorm_backward_rows),
	.layernorm_backward_cols = LLM_TASK(layernorm_backward_cols),
	.attention_forward_task = LLM_TASK(attention_forward_task),
	.attention_backward_task = LLM_TASK(attention_backward_task),
	.gelu_forward_task = LLM_TASK(gelu_forward_task),
	.gelu_backward_task = LLM_TASK(gelu_backward_task),
	.residual_task = LLM_TASK(residual_task),
	.crossentropy_task = LLM_TASK(crossentropy_task),
	.norm_task = LLM_TASK(norm_task),
	.adamw_task = LLM_TASK(adamw_task),
	.bias_fill_task = LLM_TASK(bias_fill_task),
	.bias_backward_task = LLM_TASK(bias_backward_task),
	.attention_prompt_head = LLM_TASK(attention_prompt_head),
	.attention_step_row = LLM_TASK(attention_step_row),
	.first_nonfinite = LLM_TASK(first_nonfinite),
};
