r"""Byte-level LM comparison: train each mixer on the same tokens, then measure its decoding.

  python scripts/lm_compare.py --out=runs/lm_compare
  python scripts/lm_compare.py --out=/tmp/lm --models=s4d,transformer --size=tiny \
      --num_steps=2 --contexts=64,256 --decode_steps=8 --warmup_steps=2 --data_path=corpus.txt
  python scripts/lm_compare.py --out=runs/lm_imdb --recipes=imdb --dtype=bfloat16  # GPU

For each model of the recipe file, configs/lm/<--recipes>.py: shakespeare (mamba, mamba2,
lightning, s4d, transformer; ~3.6M parameters each at the default size) or imdb (mamba,
mamba2, lightning, transformer at GPT-2-small scale, bf16 by default); --dtype overrides
config.model.dtype:

  1. Train with `train.trainer.run` into OUT/<model>, the same steps x batch x seq_len tokens
     for every model. A workdir whose results.json already covers the requested steps
     under the same config is reused without training; an unfinished one resumes from
     its checkpoint (the trainer does that).
  2. Read validation / test bits per byte from results.json and the median training
     tokens/s and MFU from metrics.jsonl (the trainer logs tokens_per_s and, on a device
     kind with a known peak, mfu per log interval, the first, compiling, step excluded).
  3. Restore the final checkpoint (the trainer's own model graph and Checkpointer) and
     sample --gen_tokens tokens with `models.generate` (recurrent decoding) after a
     prompt from the validation split: OUT/<model>/sample.txt.
  4. For each context C in --contexts: fill a decoding state with C - W - 2T real tokens
     (prefill by stepping, in one jitted lax.scan: no mixer returns its state from the
     parallel forward), then W warm-up steps, T single-token steps timed one by one
     (jitted, state donated; median ms/token, Python dispatch included) and T more as one
     jitted lax.scan, run twice from the same state, the second timed (scan_ms_per_token:
     device time per token, as `models.generate` decodes). W = --warmup_steps,
     T = --decode_steps; the state holds exactly C positions at the end (the attention
     KV cache is sized max_len = C). The decoding state's size
     is the sum of its arrays' nbytes: a recurrent model's is the same at every C
     (constant memory per token), the KV cache grows linearly with C.

Writes OUT/lm_table.md (the markdown table, also printed) and OUT/lm_compare.json (the
same numbers plus per-context prefill time, scan ms/token and the samples).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python scripts/lm_compare.py` from anywhere
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs.lm import imdb, shakespeare  # noqa: E402

log = logging.getLogger("lm_compare")

ATTENTION_MODELS = ("transformer",)  # the others must decode at constant memory
RECIPES = {"shakespeare": shakespeare, "imdb": imdb}  # --recipes: configs/lm/<name>.py
DTYPES = ("float32", "bfloat16")


# -- arguments ----------------------------------------------------------------------------

def parse_models(text: str, recipes=shakespeare) -> list[str]:
  """"mamba,s4d" -> ["mamba", "s4d"]; unknown or repeated names -> ValueError."""
  names = [m.strip() for m in text.split(",") if m.strip()]
  if not names:
    raise ValueError(f"--models needs at least one model; valid: {list(recipes.MODELS)}")
  unknown = [m for m in names if m not in recipes.MODELS]
  if unknown:
    raise ValueError(f"unknown model(s) {unknown} in --models={text!r}; valid: "
                     f"{list(recipes.MODELS)}")
  if len(set(names)) != len(names):
    raise ValueError(f"--models={text!r} names a model twice")
  return names


def parse_contexts(text: str) -> list[int]:
  """"1024,16k" -> [1024, 16384] (a "k" suffix means x1024); sorted, distinct, >= 1."""
  out = []
  for part in text.split(","):
    part = part.strip().lower()
    scale = 1024 if part.endswith("k") else 1
    digits = part[:-1] if scale > 1 else part
    if not digits.isdigit() or int(digits) < 1:
      raise ValueError(f"bad --contexts={text!r}: {part!r} is not a positive int "
                       "(e.g. --contexts=1024,16384 or 1k,16k)")
    out.append(int(digits) * scale)
  if len(set(out)) != len(out):
    raise ValueError(f"bad --contexts={text!r}: a context appears twice")
  return sorted(out)


def context_label(c: int) -> str:
  return f"{c // 1024}k" if c % 1024 == 0 else str(c)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output directory (one workdir per model)")
  p.add_argument("--recipes", default="shakespeare", help=f"configs/lm/<name>.py, one of "
                 f"{list(RECIPES)}")
  p.add_argument("--models", default=None, help="comma-separated (default: every model of "
                 "the recipe file)")
  p.add_argument("--size", default="", help="config size (shakespeare: '', long, tiny; "
                 "imdb: '', tiny)")
  p.add_argument("--dtype", default=None, help=f"config.model.dtype override, one of {DTYPES}")
  p.add_argument("--num_steps", type=int, default=None, help="training steps (default: config)")
  p.add_argument("--data_path", default=None,
                 help="text file or directory of *.txt (default: Tiny Shakespeare)")
  p.add_argument("--contexts", default="1024,16384")
  p.add_argument("--decode_steps", type=int, default=64, help="timed steps per context (T)")
  p.add_argument("--warmup_steps", type=int, default=8, help="untimed steps first (W)")
  p.add_argument("--gen_tokens", type=int, default=200)
  p.add_argument("--prompt_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.8)
  p.add_argument("--seed", type=int, default=0)
  return p


def check_args(args) -> tuple[list[str], list[int]]:
  """Validated (models, contexts); ValueError with the flag's name otherwise."""
  if args.recipes not in RECIPES:
    raise ValueError(f"unknown --recipes={args.recipes!r}; valid: {list(RECIPES)}")
  recipes = RECIPES[args.recipes]
  models = parse_models(args.models or ",".join(recipes.MODELS), recipes)
  contexts = parse_contexts(args.contexts)
  if args.size not in recipes.SIZES:
    raise ValueError(f"unknown --size={args.size!r} for --recipes={args.recipes}; valid: "
                     f"{list(recipes.SIZES)}")
  if args.dtype is not None and args.dtype not in DTYPES:
    raise ValueError(f"unknown --dtype={args.dtype!r}; valid: {list(DTYPES)}")
  for name in ("decode_steps", "warmup_steps", "gen_tokens", "prompt_tokens"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.num_steps is not None and args.num_steps < 1:
    raise ValueError(f"--num_steps must be >= 1, got {args.num_steps}")
  if args.temperature < 0:
    raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
  overhead = args.warmup_steps + 2 * args.decode_steps
  if contexts[0] <= overhead:
    raise ValueError(f"bad --contexts={args.contexts!r}: every context must exceed "
                     f"warmup_steps + 2 * decode_steps = {overhead} (at least one prefilled "
                     "token); lower --decode_steps / --warmup_steps or raise the context")
  return models, contexts


# -- training -----------------------------------------------------------------------------

def model_config(model: str, size: str, num_steps: int | None, data_path: str | None,
                 recipes: str = "shakespeare", dtype: str | None = None):
  """configs/lm/<recipes>.py:<model>[,size] with the script's overrides."""
  config = RECIPES[recipes].get_config(f"{model},{size}" if size else model)
  if dtype is not None:
    config.model.dtype = dtype
  if num_steps is not None:
    config.train.num_steps = num_steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, num_steps)
  if data_path is not None:
    config.data.path = str(data_path)
  return config


def tokens_per_step(config) -> int:
  return config.train.batch_size * config.data.seq_len


def _same_saved_config(config, workdir: Path) -> bool:
  path = workdir / "config.json"
  if not path.is_file():
    return False
  return json.loads(path.read_text()) == json.loads(config.to_json_best_effort())


def train_model(config, workdir: Path) -> tuple[dict, bool]:
  """(results.json content, whether this call trained). Finished runs are reused."""
  from train import trainer

  results_path = workdir / "results.json"
  if results_path.is_file() and _same_saved_config(config, workdir):
    results = json.loads(results_path.read_text())
    if results.get("steps") == config.train.num_steps:
      log.info("%s: already trained for %d steps; reusing it", workdir, results["steps"])
      return results, False
  results = trainer.run(config, str(workdir))
  if "halted_at_step" in results:
    raise RuntimeError(f"training in {workdir} halted at step {results['halted_at_step']}")
  return results, True


def median_train_metric(workdir: Path, key: str = "tokens_per_s") -> float | None:
  """Median of a value the trainer logged on its train lines of metrics.jsonl
  (tokens_per_s, mfu, model_tflops_per_s); None if it never logged it."""
  from train import metrics

  values = [m[key] for m in metrics.read_metrics(str(workdir))
            if m.get("split") == "train" and key in m]
  return float(statistics.median(values)) if values else None


def best_val_bpb(workdir: Path) -> tuple[float | None, int | None]:
  """The lowest validation bits per byte the trainer logged during the run, and its step
  (small corpora overfit: the final value can be far above it)."""
  from train import metrics

  vals = [(m["bits_per_byte"], m["step"]) for m in metrics.read_metrics(str(workdir))
          if m.get("split") == "val" and "bits_per_byte" in m]
  return min(vals) if vals else (None, None)


def restore_model(config, workdir: Path):
  """(LanguageModel with the latest checkpoint's parameters, task, splits, step)."""
  import data
  from train import checkpoint, sharding, trainer

  task, splits = data.load_task(config.data)
  mesh = sharding.make_mesh(config.train.mesh)
  tr = trainer.Trainer(config, task, mesh)
  ckpt = checkpoint.Checkpointer(str(workdir), keep=config.train.keep_checkpoints)
  try:
    restored = ckpt.restore_latest(tr.abstract_state)
  finally:
    ckpt.close()
  if restored is None:
    raise RuntimeError(f"no readable checkpoint in {workdir}/checkpoints")
  step, state, _, _ = restored
  model = nnx.merge(tr.graphdef, state.params, tr.init_rngs(), state.rest)
  return model, task, splits, step


def count_params(model) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


# -- decoding -----------------------------------------------------------------------------

def token_stream(split, length: int) -> np.ndarray:
  """The split's packed tokens (padding dropped), repeated to `length` (1-D int32)."""
  stream = np.asarray(split["inputs"]).reshape(-1)
  stream = stream[stream != 0]
  if stream.size == 0:
    raise ValueError("the validation split has no tokens")
  return np.resize(stream, length).astype(np.int32)


def tree_nbytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def _prefill_fn(graphdef, max_len, state, tokens_bl):
  """tokens (b, l) -> (decoding state after them, next-token logits (b, vocab) float32)."""
  model = nnx.merge(graphdef, state)
  rec = model.init_state(tokens_bl.shape[0], max_len=max_len)

  def feed(carry, tok):
    rec, _ = carry
    rec, logits = model.step(rec, tok)
    return (rec, logits.astype(jnp.float32)), None

  logits0 = jnp.zeros((tokens_bl.shape[0], model.num_classes), jnp.float32)
  (rec, logits), _ = jax.lax.scan(feed, (rec, logits0), tokens_bl.T)
  return rec, logits


def _step_fn(graphdef, state, rec, tok):
  """One greedy decoding step: (rec, token (b,)) -> (rec, next token (b,))."""
  model = nnx.merge(graphdef, state)
  rec, logits = model.step(rec, tok)
  return rec, jnp.argmax(logits, -1).astype(jnp.int32)


def _scan_fn(graphdef, num_steps, state, rec, tok):
  """num_steps greedy decoding steps in one lax.scan (as models.generate decodes)."""
  def body(carry, _):
    return _step_fn(graphdef, state, *carry), None
  (rec, tok), _ = jax.lax.scan(body, (rec, tok), None, length=num_steps)
  return rec, tok


# Module-level jits keyed on the (hashable) graphdef: a recurrent model's state has the
# same shapes at every context, so its step and scan compile once, not once per context.
_prefill_jit = jax.jit(_prefill_fn, static_argnums=(0, 1))
_step_jit = jax.jit(_step_fn, static_argnums=(0,), donate_argnums=(2,))
_scan_jit = jax.jit(_scan_fn, static_argnums=(0, 1))


def prefill(model, tokens_bl, max_len: int | None = None):
  """Step `model` through tokens (b, l) from a fresh state (one jitted lax.scan).

  Returns (decoding state, logits (b, vocab) float32 for the token after them);
  max_len sizes attention KV caches (default: l).
  """
  tokens_bl = jnp.asarray(tokens_bl, jnp.int32)
  graphdef, state = nnx.split(model)
  return _prefill_jit(graphdef, max_len or tokens_bl.shape[1], state, tokens_bl)


def _block(tree):
  jax.block_until_ready(tree)
  return tree


def decode_benchmark(model, tokens: np.ndarray, context: int, *, warmup_steps: int,
                     decode_steps: int, batch_size: int = 1) -> dict:
  """Decoding state size and step time at `context` positions (module docstring, step 4).

  tokens: 1-D ids, at least context - warmup_steps - 2 * decode_steps of them.
  """
  num_prefill = context - warmup_steps - 2 * decode_steps
  if num_prefill < 1:
    raise ValueError(f"context {context} leaves no token to prefill")
  graphdef, state = nnx.split(model)
  prompt = jnp.asarray(np.tile(tokens[:num_prefill], (batch_size, 1)), jnp.int32)

  compiled = _prefill_jit.lower(graphdef, context, state, prompt).compile()
  t0 = time.perf_counter()
  rec, logits = _block(compiled(state, prompt))
  prefill_s = time.perf_counter() - t0
  tok = jnp.argmax(logits, -1).astype(jnp.int32)
  state_bytes = tree_nbytes(rec)

  for _ in range(warmup_steps):  # the first call compiles
    rec, tok = _block(_step_jit(graphdef, state, rec, tok))
  times = []
  for _ in range(decode_steps):
    t0 = time.perf_counter()
    rec, tok = _block(_step_jit(graphdef, state, rec, tok))
    times.append(time.perf_counter() - t0)
  if tree_nbytes(rec) != state_bytes:
    raise AssertionError("the decoding state changed size while stepping")

  # The last decode_steps positions: run once to compile (result dropped), once timed.
  _block(_scan_jit(graphdef, decode_steps, state, rec, tok))
  t0 = time.perf_counter()
  rec, tok = _block(_scan_jit(graphdef, decode_steps, state, rec, tok))
  scan_s = time.perf_counter() - t0
  return dict(context=context, state_bytes=state_bytes,
              ms_per_token=1e3 * statistics.median(times),
              scan_ms_per_token=1e3 * scan_s / decode_steps,
              prefill_tokens=num_prefill, prefill_s=prefill_s)


def detokenize(ids, tokenizer: str) -> str:
  """Byte ids -> text, document separators shown as blank lines; other tokenizers: ids."""
  from data import lm

  ids = np.asarray(ids).reshape(-1)
  if tokenizer != "byte":
    return " ".join(map(str, ids.tolist()))
  tok = lm.ByteTokenizer()
  cuts = np.flatnonzero(ids == lm.SEP_ID)
  pieces = np.split(ids, cuts)
  return "\n\n".join(tok.decode(p) for p in pieces).lstrip("\n")


def write_sample(model, prompt: np.ndarray, num_tokens: int, *, seed: int,
                 temperature: float, tokenizer: str, path: Path, title: str) -> dict:
  """Sample with models.generate (recurrent decoding) and write prompt + sample to path."""
  from models.generate import generate

  out = generate(model, jnp.asarray(prompt)[None], num_tokens, rng=jax.random.key(seed),
                 temperature=temperature)
  out = np.asarray(jax.device_get(out))[0]
  prompt_text = detokenize(out[:len(prompt)], tokenizer)
  sample_text = detokenize(out[len(prompt):], tokenizer)
  path.write_text(f"# {title}\n--- prompt ---\n{prompt_text}\n--- sample ---\n{sample_text}\n",
                  encoding="utf-8", errors="surrogateescape")
  return dict(prompt=prompt_text, sample=sample_text)


# -- the table ----------------------------------------------------------------------------

def _fmt(v, spec):
  return "-" if v is None else format(v, spec)


def format_table(report: dict) -> str:
  """Markdown table of report["rows"] plus a line naming the device and date."""
  labels = [context_label(c) for c in report["contexts"]]
  head = (["model", "params", "tokens trained", "val bpb", "test bpb", "best val bpb (step)",
           "train tokens/s", "MFU", "dtype"]
          + [f"state bytes @{c}" for c in labels] + [f"ms/token @{c}" for c in labels]
          + [f"scan ms/token @{c}" for c in labels] + ["constant state"])
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + [":---:"]) + "|"]
  for r in report["rows"]:
    dec = [r["decode"][str(c)] for c in report["contexts"]]
    cells = ([r["model"], f"{r['params']:,}", f"{r['tokens_trained']:,}",
              _fmt(r["val_bpb"], ".4f"), _fmt(r["test_bpb"], ".4f"),
              "-" if r.get("best_val_bpb") is None
              else f"{r['best_val_bpb']:.4f} ({r['best_val_step']})",
              _fmt(r["train_tokens_per_s"], ",.0f"),
              "-" if r.get("train_mfu") is None else f"{100 * r['train_mfu']:.1f}%",
              r.get("dtype", "float32")]
             + [f"{d['state_bytes']:,}" for d in dec]
             + [f"{d['ms_per_token']:.3f}" for d in dec]
             + [f"{d['scan_ms_per_token']:.3f}" for d in dec]
             + ["yes" if r["constant_state"] else "no (grows)"])
    lines.append("| " + " | ".join(cells) + " |")
  foot = (f"\nDevice: {report['device']} x{report['device_count']}, jax {report['jax_version']}, "
          f"{report['date']}. Config: configs/lm/{report.get('recipes', 'shakespeare')}.py size "
          f"{report['size'] or 'default'!r}, {report['num_steps']} steps. bpb: bits per byte "
          "of text (data.lm.bits_per_byte); best val: the lowest value logged during the run. "
          "ms/token: median of single jitted decoding steps (batch 1, host dispatch "
          "included) at the given context; scan ms/token: the same steps inside one jitted "
          "lax.scan (device time); state bytes: the decoding state's arrays.")
  return "\n".join(lines) + "\n" + foot + "\n"


# -- main ---------------------------------------------------------------------------------

def run_model(model_name: str, args, contexts: list[int], out: Path) -> dict:
  config = model_config(model_name, args.size, args.num_steps, args.data_path, args.recipes,
                        args.dtype)
  workdir = out / model_name
  results, trained = train_model(config, workdir)
  model, _, splits, step = restore_model(config, workdir)
  if step != results["steps"]:
    raise RuntimeError(f"{workdir}: latest checkpoint is step {step}, results.json step "
                       f"{results['steps']}")
  tokenizer = config.data.tokenizer
  stream = token_stream(splits["validation"], max(contexts[-1], args.prompt_tokens))
  sample = write_sample(model, stream[:args.prompt_tokens], args.gen_tokens, seed=args.seed,
                        temperature=args.temperature, tokenizer=tokenizer,
                        path=workdir / "sample.txt",
                        title=f"{model_name}: {args.gen_tokens} tokens at temperature "
                              f"{args.temperature} after {args.prompt_tokens} validation tokens")
  decode = {}
  for c in contexts:
    d = decode_benchmark(model, stream, c, warmup_steps=args.warmup_steps,
                         decode_steps=args.decode_steps)
    log.info("%s @%d: state %d bytes, %.3f ms/token (scan %.3f), prefill %d tokens in %.1f s",
             model_name, c, d["state_bytes"], d["ms_per_token"], d["scan_ms_per_token"],
             d["prefill_tokens"], d["prefill_s"])
    decode[str(c)] = d
  sizes = {d["state_bytes"] for d in decode.values()}
  constant = len(sizes) == 1
  best = best_val_bpb(workdir)
  if not constant and model_name not in ATTENTION_MODELS:
    log.warning("%s: decoding state size depends on the context: %s", model_name, sizes)
  return dict(model=model_name, config=config.name, params=count_params(model),
              steps=results["steps"], trained_now=trained,
              tokens_trained=results["steps"] * tokens_per_step(config),
              val_bpb=results.get("val_bits_per_byte"),
              test_bpb=results.get("test_bits_per_byte"),
              val_loss=results["val_loss"], test_loss=results["test_loss"],
              train_tokens_per_s=median_train_metric(workdir, "tokens_per_s"),
              train_mfu=median_train_metric(workdir, "mfu"),
              dtype=str(config.model.get("dtype", "float32")),
              best_val_bpb=best[0], best_val_step=best[1],
              decode=decode, constant_state=constant, **sample)


def main(argv=None) -> dict:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    models, contexts = check_args(args)
  except ValueError as e:
    parser.error(str(e))
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file operation
  out = Path(args.out).expanduser().resolve()
  out.mkdir(parents=True, exist_ok=True)
  rows = [run_model(m, args, contexts, out) for m in models]
  if len({r["tokens_trained"] for r in rows}) != 1:
    log.warning("models were trained on different token counts: %s",
                {r["model"]: r["tokens_trained"] for r in rows})
  report = dict(
      device=jax.devices()[0].device_kind, device_count=jax.device_count(),
      jax_version=jax.__version__,
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      recipes=args.recipes, size=args.size, num_steps=rows[0]["steps"], contexts=contexts,
      decode_steps=args.decode_steps, warmup_steps=args.warmup_steps, rows=rows)
  table = format_table(report)
  print(table)
  (out / "lm_table.md").write_text(table)
  (out / "lm_compare.json").write_text(json.dumps(report, indent=1, allow_nan=True))
  return report


if __name__ == "__main__":
  main()
