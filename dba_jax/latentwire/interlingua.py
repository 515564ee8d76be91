"""The interlingua variant (hope_latentwire.md B, "Interlingua"; the original's latentwire/models.py at 76aecdcc).

No source LM runs: a byte encoder reads the question's text prompt as UTF-8 bytes, M learned queries pool it into
Z [M, d_z] (what goes on the wire), and one adapter per receiving LM turns Z into M input embeddings of that LM.
Here both of our LMs receive (`model.receivers`, default source and target), each with its own adapter.

  ByteEncoder   byte embedding + sinusoidal positions -> enc_layers post-LN transformer encoder layers (GELU FFN
                ff_mult·d_z, torch's TransformerEncoderLayer order) -> LayerNorm. Padding bytes are masked as keys
                (the original passed no mask, so padding bytes were attended to).
  LatentPooler  M queries [M, d_z] ~ N(0, 1/d_z); out = cross_attn(q, feats) + q; g = sigmoid(Linear(LN(out)));
                out = g·out + (1 - g)·q; out += FFN (LN -> d_z -> 2 d_z -> GELU -> d_z).
  Adapter       x = LN(z); h = proj_out(gelu(mid(gelu(proj_in(x))))) + skip(x) (hidden adapter_mult·d_z);
                FiLM: h·sigmoid(film_scale(z)) + film_shift(z); out_norm LN; times a learned scalar (init 1).
                Linear weights xavier (normal with the xavier-uniform variance), biases 0.
  Then the bridge's RMS matching to the receiver's median embedding RMS (the original's calibrate_to_embed_rms).

Loss per receiver, averaged over receivers (the original's train.py): answer NLL (teacher forced, loss.nll_weight)
+ first_weight·first-token CE + kce_weight·CE over the first kce_tokens answer tokens + kd_weight·tau²·KL(text-
prompted teacher ‖ student) over those tokens at temperature kd_tau (losses.first_k_ce, losses.kd_first_k). Student
input [prefix ; stub ; answer], the teacher [question prompt ; stub ; answer], both from sides.bridge_batch.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dba_jax.configlib import Config, ConfigError, lock
from dba_jax.latentwire import bridge as bridge_lib, losses as lw_losses, sides, tasks as tasks_lib
from dba_jax.latentwire.bridge import Attention, _layernorm, _linear
from dba_jax.latentwire.optim import make_optimizer
from dba_jax.layers import normal_init

RECEIVERS = ("source", "target")


def interlingua_config() -> Config:
  c = Config()
  c.model = m = Config()
  m.kind = "interlingua"
  m.M = 8  # latent slots
  m.d_z = 64  # latent width (the original: 256)
  m.enc_layers = 2  # byte-encoder layers (the original: 6)
  m.heads = 4
  m.ff_mult = 4
  m.adapter_mult = 2
  m.receivers = RECEIVERS  # the LMs that get an adapter: source and / or target
  m.rms_clamp = (0.25, 4.0)
  c.loss = ls = Config()
  ls.nll_weight = 1.0
  ls.first_weight = 0.5
  ls.kce_weight = 0.5
  ls.kce_tokens = 4
  ls.kd_weight = 1.0
  ls.kd_tau = 2.0
  c.optim = o = Config()
  o.lr = 1e-3
  o.b1, o.b2, o.eps = 0.9, 0.98, 1e-8
  o.weight_decay = 0.01
  o.gate_lr_mult = 1.0  # no tanh gates here; kept so the optimizer is the bridge's
  o.warmup_steps = 50
  o.clip_norm = 1.0
  c.data = d = Config()
  tasks_lib.add_fields(d)  # as the bridge's (dba_jax/latentwire/tasks.py)
  d.train_seed, d.train_pairs, d.dev_seed, d.dev_questions = 0, 20_000, 1, 32
  d.eval_batch = 16
  d.byte_len = 128  # the encoder's input: the text prompt as UTF-8 bytes
  d.tgt_len = (64, 32)  # stub + answer, per receiver in RECEIVERS order (source bytes, target BPE)
  d.prompt_len = (128, 64)  # the teacher's question prompt, per receiver
  d.max_new = 24
  c.train = t = Config()
  t.steps, t.batch_size, t.seed = 300, 32, 0
  t.log_every, t.eval_every, t.ckpt_every, t.keep_ckpts = 25, 150, 150, 2
  t.patience = 0  # early stopping on the target's dev exact match (0: never stop early)
  c.mesh = ms = Config()
  ms.shape = (1, -1, 1)
  c.source = ""
  c.target = ""
  return lock(c)


def cpu_config() -> Config:
  c = interlingua_config()
  c.model.M, c.model.d_z, c.model.enc_layers, c.model.heads = 3, 16, 1, 2
  c.optim.warmup_steps = 2
  c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every, c.train.ckpt_every = 4, 4, 1, 2, 2
  c.data.train_pairs, c.data.dev_questions, c.data.max_new = 64, 2, 8
  return c


def validate(c: Config) -> Config:
  m, ls, d, t = c.model, c.loss, c.data, c.train

  def need(ok, msg):
    if not ok:
      raise ConfigError(msg)

  for key in ("M", "d_z", "enc_layers", "heads", "ff_mult", "adapter_mult"):
    need(m[key] > 0, f"model.{key}={m[key]} must be positive")
  need(m.d_z % m.heads == 0, f"model.d_z={m.d_z} is not divisible by model.heads={m.heads}")
  bad = [r for r in m.receivers if r not in RECEIVERS]
  need(m.receivers and not bad and len(set(m.receivers)) == len(m.receivers),
       f"model.receivers={tuple(m.receivers)} must be distinct names from {RECEIVERS}")
  need(len(m.rms_clamp) == 2 and 0 < m.rms_clamp[0] <= m.rms_clamp[1],
       f"model.rms_clamp={tuple(m.rms_clamp)} must be (lo, hi) with 0 < lo <= hi")
  for key in ("nll_weight", "first_weight", "kce_weight", "kd_weight"):
    need(ls[key] >= 0, f"loss.{key}={ls[key]} must be >= 0")
  need(ls.kce_tokens > 0 and ls.kd_tau > 0, f"loss.kce_tokens={ls.kce_tokens} and loss.kd_tau={ls.kd_tau} must be "
       "positive")
  need(c.optim.lr > 0, f"optim.lr={c.optim.lr} must be positive")
  for key in ("tgt_len", "prompt_len"):
    need(len(d[key]) == len(RECEIVERS) and min(d[key]) > 0,
         f"data.{key}={tuple(d[key])} must be {len(RECEIVERS)} positive lengths ({', '.join(RECEIVERS)})")
  for key in ("train_pairs", "byte_len", "max_new"):
    need(d[key] > 0, f"data.{key}={d[key]} must be positive")
  for key in ("steps", "batch_size", "log_every", "eval_every", "ckpt_every", "keep_ckpts"):
    need(t[key] > 0, f"train.{key}={t[key]} must be positive")
  need(t.patience >= 0 and d.eval_batch > 0, f"train.patience={t.patience} must be >= 0 and data.eval_batch="
       f"{d.eval_batch} positive")
  try:
    tasks_lib.from_config(d)
  except tasks_lib.TaskError as e:
    raise ConfigError(str(e)) from None
  return c


# ------------------------------------------------------------------------------------------------ modules

def sinusoids(T: int, d: int) -> np.ndarray:
  """[T, d]: sin on even features, cos on odd, frequencies 10000^(-2i/d) (the original's PositionalEncoding)."""
  pos = np.arange(T, dtype=np.float64)[:, None]
  freq = np.exp(np.arange(0, d, 2, dtype=np.float64) * (-math.log(10000.0) / d))
  pe = np.zeros((T, d))
  pe[:, 0::2], pe[:, 1::2] = np.sin(pos * freq), np.cos(pos * freq)[:, :d // 2]
  return pe.astype(np.float32)


def _xavier(d_in, d_out, rngs):
  return _linear(d_in, d_out, rngs, std=math.sqrt(2.0 / (d_in + d_out)))


class EncoderLayer(nnx.Module):
  """Post-LN: x = LN1(x + SA(x)); x = LN2(x + FFN(x)), GELU FFN."""

  def __init__(self, d: int, heads: int, ff_mult: int, rngs: nnx.Rngs):
    self.attn = Attention(d, d, heads, rngs)
    self.norm1, self.norm2 = _layernorm(d), _layernorm(d)
    self.ff_in, self.ff_out = _linear(d, ff_mult * d, rngs), _linear(ff_mult * d, d, rngs)

  def __call__(self, x_BTd, mask_BT):
    x_BTd = self.norm1(x_BTd + self.attn(x_BTd, x_BTd, mask_BT))
    return self.norm2(x_BTd + self.ff_out(jax.nn.gelu(self.ff_in(x_BTd), approximate=False)))


class LatentPooler(nnx.Module):
  def __init__(self, d: int, M: int, heads: int, rngs: nnx.Rngs):
    self.latent = nnx.Param(normal_init(rngs, (M, d), 1.0 / math.sqrt(d)), axes=(None, None))
    self.cross_attn = Attention(d, d, heads, rngs)
    self.gate_norm, self.gate = _layernorm(d), _linear(d, d, rngs)
    self.ff_norm, self.ff_in, self.ff_out = _layernorm(d), _linear(d, 2 * d, rngs), _linear(2 * d, d, rngs)

  def __call__(self, feats_BTd, mask_BT):
    q = jnp.broadcast_to(self.latent[...][None], (feats_BTd.shape[0],) + self.latent.shape)
    out = self.cross_attn(q, feats_BTd, mask_BT) + q
    g = jax.nn.sigmoid(self.gate(self.gate_norm(out)))
    out = out * g + q * (1.0 - g)
    return out + self.ff_out(jax.nn.gelu(self.ff_in(self.ff_norm(out)), approximate=False))


class Adapter(nnx.Module):
  """Z [B, M, d_z] -> [B, M, d_model] (before RMS matching)."""

  def __init__(self, d_z: int, d_model: int, mult: int, rngs: nnx.Rngs):
    h = mult * d_z
    self.input_norm = _layernorm(d_z)
    self.proj_in, self.mid, self.proj_out = _xavier(d_z, h, rngs), _xavier(h, h, rngs), _xavier(h, d_model, rngs)
    self.skip = _xavier(d_z, d_model, rngs)
    self.film_scale, self.film_shift = _xavier(d_z, d_model, rngs), _xavier(d_z, d_model, rngs)
    self.out_norm = _layernorm(d_model)
    self.scale = nnx.Param(jnp.ones((1,), jnp.float32), axes=(None,))

  def __call__(self, z_BMz):
    x = self.input_norm(z_BMz)
    gelu = lambda v: jax.nn.gelu(v, approximate=False)
    h = self.proj_out(gelu(self.mid(gelu(self.proj_in(x))))) + self.skip(x)
    h = h * jax.nn.sigmoid(self.film_scale(z_BMz)) + self.film_shift(z_BMz)
    return self.out_norm(h) * self.scale[...][0]


class InterlinguaNet(nnx.Module):
  """bytes [B, T] (+ mask) -> Z [B, M, d_z]; `adapt(z, receiver)` -> [B, M, that LM's width]."""

  def __init__(self, m: Config, widths: dict, *, rngs: nnx.Rngs):
    d = m.d_z
    self.byte_emb = nnx.Param(normal_init(rngs, (256, d), 1.0), axes=(None, None))  # torch nn.Embedding: N(0, 1)
    self.layers = nnx.List([EncoderLayer(d, m.heads, m.ff_mult, rngs) for _ in range(m.enc_layers)])
    self.enc_norm = _layernorm(d)
    self.pooler = LatentPooler(d, m.M, m.heads, rngs)
    self.adapters = nnx.Dict({r: Adapter(d, widths[r], m.adapter_mult, rngs) for r in m.receivers})

  def encode(self, bytes_BT, mask_BT):
    T = bytes_BT.shape[1]
    pe_Td = jnp.asarray(sinusoids(T, self.byte_emb.shape[1]))  # a constant of the traced shape, not a parameter
    x = jnp.take(self.byte_emb[...], bytes_BT, axis=0) + pe_Td[None]
    for layer in self.layers:
      x = layer(x, mask_BT)
    return self.pooler(self.enc_norm(x), mask_BT)

  def adapt(self, z_BMz, receiver: str):
    return self.adapters[receiver](z_BMz)


# ------------------------------------------------------------------------------------------------ system

def utf8_rows(texts, length: int):
  """Text prompts as UTF-8 byte ids [B, length] and their mask; a longer prompt is an error naming the length."""
  return sides.pad([np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) for t in texts], length,
                   "data.byte_len (the encoder's bytes)")


class Interlingua:
  """The encoder, pooler and adapters, both frozen LMs, and the jitted steps (the trainer's interface of Bridge)."""

  def __init__(self, c: Config, src: sides.LM, tgt: sides.LM):
    self.c, self.src, self.tgt = c, src, tgt
    self.task = tasks_lib.from_config(c.data)
    self.lms = {"source": src, "target": tgt}
    m = c.model
    self.receivers = tuple(m.receivers)
    widths = {r: self.lms[r].width for r in self.receivers}
    build = lambda key: InterlinguaNet(m, widths, rngs=nnx.Rngs(key))
    self.build = build
    self.graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(0)))
    self.abstract_params = nnx.to_pure_dict(abstract)
    self.rms = {r: bridge_lib.target_rms(self.lms[r].model.params["embed"], self.lms[r].vocab) for r in self.receivers}
    self.frozen = {r: self.lms[r].model.params for r in self.receivers}
    self.tx = make_optimizer(c, self.abstract_params)
    self._latents = jax.jit(self.latents)
    self._prefix = jax.jit(self.prefix, static_argnums=2)
    self.train_step = jax.jit(self._train_step, donate_argnums=0)
    self._speakers = {}

  def net(self, params):
    return nnx.merge(self.graphdef, params)

  def init_state(self, seed: int) -> dict:
    params = nnx.to_pure_dict(nnx.state(self.build(seed)))
    return {"params": params, "opt": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}

  # -- the wire: Z from the question's bytes, and each receiver's prefix from a (received) Z
  def latents(self, params, bytes_BT, mask_BT):
    return self.net(params).encode(bytes_BT, mask_BT)

  def prefix(self, params, z_BMz, receiver: str):
    soft = self.net(params).adapt(z_BMz, receiver)
    return bridge_lib.rms_match(soft, self.rms[receiver], tuple(self.c.model.rms_clamp))

  def batch(self, examples) -> dict:
    d, examples = self.c.data, tasks_lib.as_examples(examples)
    ids, n = utf8_rows([self.task.prompt(ex) for ex in examples], d.byte_len)
    out = {"bytes": ids, "bytes_mask": np.arange(d.byte_len)[None] < n[:, None]}
    for r in self.receivers:
      i = RECEIVERS.index(r)
      lm = self.lms[r]  # only the receiver's own rows (stub + answer, its teacher) are used
      b = sides.bridge_batch(self.task, lm, lm, examples, d.prompt_len[i] + d.tgt_len[i], d.tgt_len[i],
                             d.prompt_len[i])
      out.update({f"{r}/{k}": v for k, v in b.items() if not k.startswith("src_")})
    return out

  def loss(self, params, frozen, batch, step=None):
    ls, parts, total = self.c.loss, {}, 0.0
    z = self.latents(params, batch["bytes"], batch["bytes_mask"])
    for r in self.receivers:
      lm, get = self.lms[r], (lambda k: batch[f"{r}/{k}"])
      soft = self.prefix(params, z, r)
      dec = nnx.merge(lm.model.graphdef, frozen[r])
      M, T, V = soft.shape[1], get("tgt_ids").shape[1], lm.vocab
      student = dec.forward(get("tgt_ids"), embeds_BPd=soft).logits[:, M - 1:M - 1 + T]
      teacher_all = jax.lax.stop_gradient(dec.forward(get("teacher_ids")).logits)
      idx_BT = get("teacher_off")[:, None] + jnp.arange(T)[None, :] - 1
      teacher = jnp.take_along_axis(teacher_all, idx_BT[:, :, None], axis=1)
      y, mask = get("tgt_ids"), get("label_mask")
      p = {"nll": lw_losses.answer_nll(student, y, mask, V), "first": lw_losses.first_k_ce(student, y, mask, 1, V),
           "kce": lw_losses.first_k_ce(student, y, mask, ls.kce_tokens, V),
           "kd": lw_losses.kd_first_k(student, teacher, mask, ls.kce_tokens, V, ls.kd_tau),
           "teacher_nll": lw_losses.answer_nll(teacher, y, mask, V)}
      total = total + (ls.nll_weight * p["nll"] + ls.first_weight * p["first"] + ls.kce_weight * p["kce"]
                       + ls.kd_weight * p["kd"])
      parts.update({f"{k}_{r}": v for k, v in p.items()})
    return total / len(self.receivers), parts

  def _train_step(self, state, frozen, batch, key):
    (loss, parts), grads = jax.value_and_grad(self.loss, has_aux=True)(state["params"], frozen, batch)
    updates, opt = self.tx.update(grads, state["opt"], state["params"])
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)}
    new = {"params": optax.apply_updates(state["params"], updates), "opt": opt, "step": state["step"] + 1}
    return new, metrics

  # -- what the training loop prints and evaluates
  def describe(self, n_params: int) -> str:
    m = self.c.model
    rms = ", ".join(f"{r} {self.lms[r].path} (width {self.lms[r].width}, embedding RMS {self.rms[r]:.4f})"
                    for r in self.receivers)
    return f"interlingua M={m.M} d_z={m.d_z} encoder {m.enc_layers} layers: {n_params:,} params; receivers {rms}"

  @property
  def tokens_per_step(self) -> int:
    d, M = self.c.data, self.c.model.M
    per = sum(M + 2 * d.tgt_len[RECEIVERS.index(r)] + d.prompt_len[RECEIVERS.index(r)] for r in self.receivers)
    return self.c.train.batch_size * (d.byte_len + per)

  def progress(self, last: dict) -> str:
    return "".join(f" | {r}: nll {last[f'nll_{r}']:.3f} (text {last[f'teacher_nll_{r}']:.3f}) first "
                   f"{last[f'first_{r}']:.3f} kd {last[f'kd_{r}']:.3f}" for r in self.receivers)

  def speaker(self, receiver: str) -> sides.Speaker:
    if receiver not in self._speakers:
      lm = self.lms[receiver]
      n = self.c.model.M + len(lm.encode(self.task.stub))
      self._speakers[receiver] = sides.Speaker(lm, sides.speaker_len(n, self.c.data.max_new, lm),
                                               batch=self.c.data.get("eval_batch", 16))
    return self._speakers[receiver]

  def z_of(self, params, examples) -> np.ndarray:
    """Z [N, M, d_z] from each example's text prompt (and nothing else)."""
    ids, n = utf8_rows([self.task.prompt(ex) for ex in examples], self.c.data.byte_len)
    mask = np.arange(ids.shape[1])[None] < n[:, None]
    out = [self._latents(params, jnp.asarray(ids[i:i + 64]), jnp.asarray(mask[i:i + 64]))
           for i in range(0, len(ids), 64)]
    return np.concatenate([np.asarray(o) for o in out])

  def decode(self, params, z_NMz, receiver: str, max_new: int, task=None) -> list[dict]:
    """The receiver's greedy answers from [prefix(Z) ; stub] (the question reaches it only through Z), a batch of
    Z rows [N, M, d_z] at a time."""
    lm, task = self.lms[receiver], task or self.task
    prefix = np.asarray(self._prefix(params, jnp.asarray(z_NMz, jnp.float32), receiver))
    return self.speaker(receiver).generate([lm.encode(task.stub)] * len(prefix), max_new, prefix, task)

  def dev_eval(self, params, examples, max_new: int) -> dict:
    z = self.z_of(params, examples)
    out = {}
    for r in self.receivers:
      hits = [self.task.score(o["text"], ex)[0] for o, ex in zip(self.decode(params, z, r, max_new), examples)]
      out[f"dev_exact_match_{r}"] = float(np.mean(hits)) if hits else float("nan")
    out["dev_exact_match"] = out.get("dev_exact_match_target", next(iter(out.values())))
    return out
