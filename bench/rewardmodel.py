"""Side-by-side benchmarks: the JAX reward model against the same model in PyTorch.

Both sides run the same reward model — all-MiniLM-L6-v2 (encoder + mean pooling + linear head)
or, with ``backbone="decoder"``, SmolLM2-135M-Instruct (last-token pooling; PyTorch runs
transformers' ``LlamaForSequenceClassification`` loaded from our export) — on the very same
padded batches (length-bucketed token ids and masks), so the numbers compare the model
implementations, not the data pipelines. Training: forward and backward over
chosen and rejected, Bradley–Terry loss, gradient clipping, AdamW (dropout off on both
sides, as the dynrules trainer has none). Scoring: forward only.

PyTorch and transformers are imported lazily and only here; install them with
``pip install torch==2.13.0 transformers``.
"""

from __future__ import annotations

import os
import time

import numpy as np

from dynrules.errors import DynrulesError

TORCH_HINT = "the PyTorch side needs torch and transformers: pip install torch==2.13.0 transformers"
WORDS = ("the model should refuse harmful requests and help with safe ones while explaining why "
         "a careful assistant gives accurate answers about health chemistry security and law").split()  # fmt: skip


def synthetic_pairs(count: int, seed: int = 0) -> list[dict]:
    """Prompt/chosen/rejected pairs with response lengths spread over ~10–120 words."""
    rng = np.random.default_rng(seed)

    def sentence(n):
        return " ".join(rng.choice(WORDS, size=n))

    return [
        {
            "prompt": sentence(int(rng.integers(5, 30))),
            "chosen": sentence(int(rng.integers(10, 120))),
            "rejected": sentence(int(rng.integers(10, 120))),
        }  # fmt: skip
        for _ in range(count)
    ]


def _torch():
    try:
        import torch
        import transformers
    except ImportError:
        raise DynrulesError(TORCH_HINT) from None
    torch.set_num_threads(os.cpu_count() or 1)
    return torch, transformers


def _torch_reward_model(torch, transformers, checkpoint_dir, head_kernel: np.ndarray):
    config = transformers.BertConfig.from_pretrained(
        str(checkpoint_dir), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    encoder = transformers.BertModel.from_pretrained(
        str(checkpoint_dir), config=config, add_pooling_layer=False
    )
    head = torch.nn.Linear(config.hidden_size, 1)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(head_kernel.T.copy()))
        head.bias.zero_()

    class RewardModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = encoder, head

        def forward(self, ids, mask):
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
            return self.head(pooled)[:, 0]

    return RewardModel()


def _timed(run, batches, seconds: float, warmup: int) -> tuple[float, int]:
    """(elapsed, batches done) running ``run`` over ``batches`` cyclically for ``seconds``."""
    for batch in batches[:warmup]:
        run(batch)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done < len(batches):
        run(batches[done % len(batches)])
        done += 1
    return time.perf_counter() - started, done


def _jax_model(backbone: str, max_length: int, seed: int):
    """The bundled backbone (MiniLM or SmolLM2-135M-Instruct) with a fresh head.

    The decoder's head is drawn at std 1/√hidden rather than near zero, so that its rewards are
    of order one and the JAX-vs-PyTorch reward difference means something.
    """
    from dynrules.models import classifier as mdl

    model = mdl.pretrained(backbone, None, num_outputs=1, max_length=max_length, seed=seed)
    if backbone == "decoder":
        width = model.spec.hidden_size
        kernel = np.random.default_rng(seed).normal(0, width**-0.5, (width, 1)).astype(np.float32)
        model.params = model.params | {"head_kernel": kernel}
    return model


def _torch_model(torch, transformers, model, workdir):
    """The same reward model in PyTorch: BertModel + mean pooling + head for the encoder; for
    the decoder, transformers' own ``LlamaForSequenceClassification`` loaded from our export."""
    import jax

    from dynrules.models import classifier as mdl

    if model.spec.kind == "encoder":
        return _torch_reward_model(torch, transformers, model.source, model.params["head_kernel"])
    directory = workdir / "model"
    mdl.export_model(jax.tree.map(np.asarray, model.params), model.spec, model.tokenizer,
                     directory, model.chat)  # fmt: skip
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(directory), dtype=torch.float32, attn_implementation="sdpa"
    )

    class RewardModel(torch.nn.Module):  # the encoder's signature: (ids, mask) → rewards
        def __init__(self):
            super().__init__()
            self.classifier = classifier

        def forward(self, ids, mask):
            return self.classifier(input_ids=ids, attention_mask=mask).logits[:, 0]

    return RewardModel()


MODEL_NAMES = {"encoder": "all-MiniLM-L6-v2 reward model",
               "decoder": "SmolLM2-135M-Instruct reward model (LlamaForSequenceClassification)"}  # fmt: skip


def bench_train(*, backbone: str = "encoder", pairs_per_step: int = 8, max_length: int = 128,
                seconds: float = 20.0, seed: int = 0) -> dict:  # fmt: skip
    """Training pairs/s and tokens/s, JAX vs PyTorch, same reward model and same batches."""
    import tempfile
    from pathlib import Path

    import jax

    from dynrules.train import sharding as shd
    from dynrules.train.config import TrainConfig
    from dynrules.train.data import load_preferences
    from dynrules.train.trainer import PairBatches, TokenizedPairs, Trainable

    torch, transformers = _torch()
    model = _jax_model(backbone, max_length, seed)
    config = TrainConfig(steps=10_000, batch_size=pairs_per_step, max_length=max_length,
                         learning_rate=1e-5, backbone=backbone)  # fmt: skip
    pairs = load_preferences(synthetic_pairs(pairs_per_step * 6, seed))
    tokens = TokenizedPairs.build(pairs, model.tokenizer, model.spec.max_length, model.render)
    batcher = PairBatches(tokens, seed=seed, batch_size=pairs_per_step, grad_accum=1,
                          max_length=model.spec.max_length, pad_id=model.tokenizer.pad_id)  # fmt: skip
    batches = [batcher.batch(step) for step in range(6)]
    tokens_per_batch = float(np.mean([b["lengths"].sum() for b in batches]))  # real tokens

    with tempfile.TemporaryDirectory() as workdir:
        reference = _torch_model(torch, transformers, model, Path(workdir)).train()
    trainable = Trainable.build(model.spec, config, shd.make_mesh("", jax.devices()[:1]))
    state = trainable.initial_state(model.params)
    step = trainable.train_step(config)
    device_batches = [trainable.global_batch(b) for b in batches]
    holder = {"state": state}

    def jax_run(batch):
        holder["state"], sums = step(holder["state"], batch)
        sums["loss"].block_until_ready()

    jax_seconds, jax_steps = _timed(jax_run, device_batches, seconds, warmup=len(device_batches))
    holder.clear()  # free the JAX state before PyTorch allocates its own
    del state

    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-5, weight_decay=0.01)
    torch_batches = [_torch_pairs(torch, b) for b in batches]

    def torch_run(batch):
        ids, mask = batch
        rewards = reference(ids, mask).view(-1, 2)
        loss = -torch.nn.functional.logsigmoid(rewards[:, 0] - rewards[:, 1]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()

    torch_seconds, torch_steps = _timed(torch_run, torch_batches, seconds, warmup=2)
    jax_rate = jax_steps * pairs_per_step / jax_seconds
    torch_rate = torch_steps * pairs_per_step / torch_seconds
    return {
        "benchmark": "train",
        "setup": {
            "model": MODEL_NAMES[backbone],
            "pairs_per_step": pairs_per_step,
            "max_length": model.spec.max_length,
            "real_tokens_per_step": tokens_per_batch,
            "devices": "cpu",
            "threads": os.cpu_count(),
            "torch": torch.__version__,
        },  # fmt: skip
        "results": {
            "jax_pairs_per_s": jax_rate,
            "torch_pairs_per_s": torch_rate,
            "jax_tokens_per_s": jax_rate / pairs_per_step * tokens_per_batch,
            "torch_tokens_per_s": torch_rate / pairs_per_step * tokens_per_batch,
        },
        "ratios": {"jax_over_torch": jax_rate / torch_rate},
    }


def _torch_pairs(torch, batch: dict) -> tuple:
    """[1, pairs, 2, time] numpy batch → ([pairs·2, time] ids, mask) tensors, chosen/rejected interleaved."""
    ids = batch["ids"][0].reshape(-1, batch["ids"].shape[-1])
    lengths = batch["lengths"][0].reshape(-1)
    mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask)


def bench_score(*, backbone: str = "encoder", pairs: int = 256, batch_size: int = 64,
                max_length: int = 256, seed: int = 0) -> dict:  # fmt: skip
    """Scoring pairs/s (both texts of each pair), JAX vs PyTorch, on identical bucketed batches.

    The decoder is scored from its exported directory on both sides (our import, and
    transformers' ``AutoModelForSequenceClassification``), so the reward difference also
    checks the export.
    """
    import tempfile
    from pathlib import Path

    import jax

    from dynrules.models import classifier as mdl
    from dynrules.models import tokenizer as tok
    from dynrules.train import sharding as shd
    from dynrules.train.data import load_preferences
    from dynrules.train.scoring import Scorer

    torch, transformers = _torch()
    model = _jax_model(backbone, max_length, seed)
    texts = [
        t for p in load_preferences(synthetic_pairs(pairs, seed)) for t in p.texts(model.render)
    ]
    mesh = shd.make_mesh("", jax.devices()[:1])
    with tempfile.TemporaryDirectory() as workdir:
        reference = _torch_model(torch, transformers, model, Path(workdir)).eval()
        if backbone == "decoder":
            scorer = Scorer.from_model_dir(Path(workdir) / "model", batch_size=batch_size)
        else:
            graphdef, abstract = mdl.abstract_model(model.spec)
            params = shd.place(model.params, shd.abstract_params(abstract, mesh))
            scorer = Scorer(graphdef, params, model.tokenizer, mesh,
                            max_length=model.spec.max_length, batch_size=batch_size)  # fmt: skip
    scorer(texts)  # compile every bucket once
    started = time.perf_counter()
    jax_rewards = scorer.rewards(texts)
    jax_seconds = time.perf_counter() - started

    tokens = scorer.tokenizer.encode(texts, model.spec.max_length)
    batches = []
    for chunk, width, _ in scorer.plan(tokens.lengths):  # the scorer's batches, unpadded rows
        ids, lengths = tok.pad_batch(
            [tokens.ids[i] for i in chunk], width, len(chunk), scorer.tokenizer.pad_id
        )
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        batches.append((chunk, torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask)))
    torch_rewards = np.zeros(len(texts), np.float32)
    with torch.inference_mode():
        reference(batches[0][1], batches[0][2])  # warm-up
        started = time.perf_counter()
        for chunk, ids, mask in batches:
            torch_rewards[chunk] = reference(ids, mask).numpy()
        torch_seconds = time.perf_counter() - started
    jax_rate, torch_rate = pairs / jax_seconds, pairs / torch_seconds
    real_tokens = int(tokens.lengths.sum())
    return {
        "benchmark": "score",
        "setup": {
            "model": MODEL_NAMES[backbone],
            "pairs": pairs,
            "batch_size": batch_size,
            "max_length": model.spec.max_length,
            "real_tokens": real_tokens,
            "threads": os.cpu_count(),
            "torch": torch.__version__,
        },  # fmt: skip
        "results": {
            "jax_pairs_per_s": jax_rate,
            "torch_pairs_per_s": torch_rate,
            "jax_tokens_per_s": real_tokens / jax_seconds,
            "torch_tokens_per_s": real_tokens / torch_seconds,
        },
        "ratios": {"jax_over_torch": jax_rate / torch_rate},
        "max_reward_difference": float(np.abs(jax_rewards - torch_rewards).max()),
        "reward_std": float(np.std(jax_rewards)),
    }


# Dense bf16 peak of the accelerators we expect, for MFU; override with peak_tflops.
PEAK_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v5 lite": 197.0,
    "TPU v4": 275.0,
}


def _random_decoder(
    preset: str,
    seq: int,
    pairs_per_step: int,
    *,
    dtype: str,
    param_dtype: str,
    remat: str,
    seed: int = 0,
):
    """(backbone config, Trainable, state, jitted step) of a randomly initialised decoder reward
    model of a named shape on the first device; the weights are drawn on the device."""
    import jax
    from flax import nnx

    from dynrules.models import classifier as mdl
    from dynrules.models.presets import preset as preset_config
    from dynrules.train import sharding as shd
    from dynrules.train.config import TrainConfig
    from dynrules.train.trainer import Trainable

    backbone = preset_config(preset)
    config = TrainConfig(steps=10_000, batch_size=pairs_per_step, max_length=seq, dtype=dtype,
                         param_dtype=param_dtype, remat=remat, backbone="decoder")  # fmt: skip
    spec = mdl.ModelSpec(backbone, max_length=seq)
    trainable = Trainable.build(spec, config, shd.make_mesh("", jax.devices()[:1]))
    width = backbone.hidden_size

    def init():
        model = mdl.Classifier(spec, rngs=nnx.Rngs(seed),
                               param_dtype=mdl.COMPUTE_DTYPES[param_dtype])  # fmt: skip
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        # A head of std 1/√width gives rewards of order one, so that differences mean something.
        head = jax.random.normal(jax.random.key(seed + 1), params["head_kernel"].shape)
        return params | {"head_kernel": (head * width**-0.5).astype(params["head_kernel"].dtype)}

    params = jax.jit(init, out_shardings=trainable.state_shardings["params"])()
    return backbone, trainable, trainable.initial_state(params), trainable.train_step(config)


def _random_batch(trainable, vocab_size: int, pairs_per_step: int, seq: int, seed: int) -> dict:
    """Full-length random token ids (no padding), one micro-batch."""
    rng = np.random.default_rng(seed)
    return trainable.global_batch({
        "ids": rng.integers(1, vocab_size, (1, pairs_per_step, 2, seq)).astype(np.int32),
        "lengths": np.full((1, pairs_per_step, 2), seq, np.int32),
        "margins": np.zeros((1, pairs_per_step), np.float32),
    })  # fmt: skip


def bench_train_mfu(
    *,
    preset: str = "llama-3.2-1b",
    seq: int = 2048,
    pairs_per_step: int = 4,
    steps: int = 10,
    dtype: str = "bfloat16",
    param_dtype: str = "float32",
    remat: str = "full",
    peak_tflops: float | None = None,
    against_torch: bool = False,
) -> dict:
    """Training tokens/s and model FLOPs utilisation of a decoder reward model of a named shape.

    Random weights (initialised on the device), full-length random token ids (no padding), one
    device, the dynrules train step itself (Bradley–Terry, AdamW, clipping). Model FLOPs per
    token: models.llama.train_flops_per_token (PaLM's count). ``against_torch`` also times
    transformers' ``LlamaForSequenceClassification`` of the same shape on the same device
    (:func:`torch_train_tokens_per_s`).
    """
    if against_torch:  # first, in a child process, so that each side has the device to itself
        torch_rate, torch_error = _torch_rate_in_child(preset, seq=seq, pairs_per_step=pairs_per_step,
                                                       steps=steps, dtype=dtype, remat=remat)  # fmt: skip
    import jax

    from dynrules.models import llama

    backbone, trainable, state, step = _random_decoder(
        preset, seq, pairs_per_step, dtype=dtype, param_dtype=param_dtype, remat=remat
    )
    batch = _random_batch(trainable, backbone.vocab_size, pairs_per_step, seq, seed=0)
    for _ in range(3):  # compile and warm up
        state, sums = step(state, batch)
    sums["loss"].block_until_ready()
    started = time.perf_counter()
    for _ in range(steps):
        state, sums = step(state, batch)
    sums["loss"].block_until_ready()
    seconds = time.perf_counter() - started
    tokens_per_s = steps * pairs_per_step * 2 * seq / seconds
    flops_per_token = llama.train_flops_per_token(backbone, seq)
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", str(device))
    peak = peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)
    result = {
        "benchmark": "train_mfu",
        "setup": {
            "device": kind,
            "preset": preset,
            "params": backbone.num_params,
            "seq": seq,
            "pairs_per_step": pairs_per_step,
            "dtype": dtype,
            "param_dtype": param_dtype,
            "remat": remat,
            "steps": steps,
            "jax": jax.__version__,
        },  # fmt: skip
        "results": {
            "tokens_per_s": tokens_per_s,
            "step_seconds": seconds / steps,
            "model_tflops_per_s": tokens_per_s * flops_per_token / 1e12,
            "mfu": tokens_per_s * flops_per_token / (peak * 1e12) if peak else None,
            "peak_tflops": peak,
        },
    }
    if against_torch and torch_error:
        result["torch_error"] = torch_error
    elif against_torch:
        result["results"]["torch_tokens_per_s"] = torch_rate
        result["ratios"] = {"jax_over_torch": tokens_per_s / torch_rate}
    return result


def _torch_rate_in_child(preset: str, **shape) -> tuple[float | None, str | None]:
    """(tokens/s, None) of :func:`torch_train_tokens_per_s` run in a fresh process, which gives
    the device back when it exits; (None, why) when the PyTorch side fails."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from dynrules.models.presets import preset as preset_config

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as child:
        run = child.submit(torch_train_tokens_per_s, preset_config(preset), **shape)
        try:
            return run.result(), None
        except Exception as error:  # the JAX side is still worth measuring; say why not
            return None, f"{type(error).__name__}: {error}"


def torch_train_tokens_per_s(backbone, *, seq: int, pairs_per_step: int, steps: int, dtype: str,
                             remat: str) -> float:  # fmt: skip
    """Training tokens/s of transformers' ``LlamaForSequenceClassification`` of ``backbone``'s
    shape on the first CUDA device: eager PyTorch, float32 master weights, ``torch.autocast`` in
    ``dtype``, SDPA attention without a mask (its causal fast path), fused AdamW, clipping;
    gradient checkpointing of every layer when ``remat`` is not "none"."""
    torch, transformers = _torch()
    shape = backbone.to_hf_dict() | {"num_labels": 1, "pad_token_id": 0}
    config = transformers.LlamaConfig(**shape, attn_implementation="sdpa")
    with torch.device("cuda"):
        model = transformers.LlamaForSequenceClassification(config).train()
    if remat != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=True)
    ids = torch.randint(1, backbone.vocab_size, (pairs_per_step * 2, seq), device="cuda")
    autocast_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]

    def step():
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=dtype != "float32"):
            rewards = model(input_ids=ids).logits[:, 0].float().view(-1, 2)
        loss = -torch.nn.functional.logsigmoid(rewards[:, 0] - rewards[:, 1]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * pairs_per_step * 2 * seq / (time.perf_counter() - started)


def bench_bf16_numerics(*, preset: str = "llama-3.2-1b", seq: int = 512, pairs_per_step: int = 4,
                        steps: int = 20, batches: int = 4) -> dict:  # fmt: skip
    """bf16 compute against float32 compute (highest matmul precision, no TF32), from the same
    float32 master weights over the same batches: rewards before training, then the training
    loss step by step."""
    import jax

    from dynrules.models import classifier as mdl

    runs = {}
    for dtype in ("float32", "bfloat16"):
        with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
            backbone, trainable, state, step = _random_decoder(
                preset, seq, pairs_per_step, dtype=dtype, param_dtype="float32", remat="full"
            )
            data = [_random_batch(trainable, backbone.vocab_size, pairs_per_step, seq, seed=i)
                    for i in range(batches)]  # fmt: skip
            ids = data[0]["ids"][0].reshape(pairs_per_step * 2, seq)
            rewards = jax.jit(mdl.apply, static_argnums=0)(
                trainable.graphdef, state["params"], ids, data[0]["lengths"][0].reshape(-1)
            )[:, 0]
            losses = []
            for i in range(steps):
                state, sums = step(state, data[i % batches])
                losses.append(float(sums["loss"]) / pairs_per_step)
        runs[dtype] = {"rewards": np.asarray(rewards, np.float64), "losses": np.array(losses)}
        del state, data
    exact, bf16 = runs["float32"], runs["bfloat16"]
    margin = lambda r: r[0::2] - r[1::2]  # noqa: E731 — chosen minus rejected, per pair
    return {
        "benchmark": "bf16_numerics",
        "setup": {
            "device": getattr(jax.devices()[0], "device_kind", "?"),
            "preset": preset,
            "seq": seq,
            "pairs_per_step": pairs_per_step,
            "steps": steps,
            "batches": batches,
        },  # fmt: skip
        "results": {
            "reward_std_float32": float(exact["rewards"].std()),
            "max_reward_difference": float(np.abs(bf16["rewards"] - exact["rewards"]).max()),
            "pair_order_agreement": float(
                np.mean(np.sign(margin(bf16["rewards"])) == np.sign(margin(exact["rewards"])))
            ),
            "losses_float32": exact["losses"].round(5).tolist(),
            "losses_bfloat16": bf16["losses"].round(5).tolist(),
            "max_loss_difference": float(np.abs(bf16["losses"] - exact["losses"]).max()),
        },
    }
