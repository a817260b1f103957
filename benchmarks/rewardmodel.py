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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynrules.benchmarks.paths import hh_test
from dynrules.errors import DynrulesError

if TYPE_CHECKING:
    from dynrules.models.choices import Dtype, Remat
    from dynrules.train.config import Backbone

TORCH_HINT = "the PyTorch side needs torch and transformers: pip install torch==2.13.0 transformers"
WORDS = (
    "the model should refuse harmful requests and help with safe ones while explaining why "
    "a careful assistant gives accurate answers about health chemistry security and law"
).split()


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
        }
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


def _torch_reward_model(torch: Any, transformers, checkpoint_dir, head_kernel: np.ndarray):
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


def bundled_reward_model(backbone: str, max_length: int, seed: int):
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


def _torch_model(torch: Any, transformers, model, workdir):
    """The same reward model in PyTorch: BertModel + mean pooling + head for the encoder; for
    the decoder, transformers' own ``LlamaForSequenceClassification`` loaded from our export."""
    import jax

    from dynrules.models import classifier as mdl

    if model.spec.kind == "encoder":
        return _torch_reward_model(torch, transformers, model.source, model.params["head_kernel"])
    directory = workdir / "model"
    mdl.export_model(
        jax.tree.map(np.asarray, model.params), model.spec, model.tokenizer, directory, model.chat
    )
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


MODEL_NAMES = {
    "encoder": "all-MiniLM-L6-v2 reward model",
    "decoder": "SmolLM2-135M-Instruct reward model (LlamaForSequenceClassification)",
}


def hh_pairs(path: str | Path | None = None) -> list:
    """The HH harmless-base test pairs (real, variable-length): ``path`` or the file beside the
    repository (:data:`dynrules.benchmarks.paths.HH_TEST`)."""
    from dynrules.train.data import load_preferences

    return load_preferences(hh_test(path))


def _timed(run, batches: list, seconds: float) -> tuple[float, list[int]]:
    """(elapsed, indices of the batches run) running ``run`` over ``batches`` cyclically for
    ``seconds``, and at least once over every batch."""
    done: list[int] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(done) < len(batches):
        index = len(done) % len(batches)
        run(batches[index])
        done.append(index)
    return time.perf_counter() - started, done


def _rates(
    seconds: float, done: list[int], pairs: list[int], real: list[int], padded: list[int]
) -> dict:
    """pairs/s, real (non-pad) tokens/s and the share of computed tokens that were real."""
    return {
        "pairs_per_s": sum(pairs[i] for i in done) / seconds,
        "real_tokens_per_s": sum(real[i] for i in done) / seconds,
        "real_over_computed_tokens": sum(real[i] for i in done) / sum(padded[i] for i in done),
    }


def _torch_padded(torch, seqs: list[np.ndarray], pad_id: int) -> tuple:
    """PyTorch's usual batch (``DataCollatorWithPadding``, TRL's reward collator): the texts in
    their order, right-padded to the longest of them, with an attention mask."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def bench_train(
    *,
    backbone: Backbone = "encoder",
    pairs_per_step: int = 8,
    max_length: int = 512,
    steps: int = 6,
    seconds: float = 20.0,
    data: str | Path | None = None,
    seed: int = 0,
) -> dict:
    """Training pairs/s and real tokens/s on HH harmless pairs: JAX with packed rows, JAX with
    one text a row (length buckets), and PyTorch + transformers with its usual padded batches
    (each step's texts padded to the longest of them). The same reward model, the same ``steps``
    steps of pairs (cycled for ``seconds`` a side after every JAX shape is compiled), Bradley–Terry
    loss, clipping, AdamW, dropout off."""
    import tempfile

    import jax

    from dynrules.train import sharding as shd
    from dynrules.train.config import TrainConfig
    from dynrules.train.trainer import ExampleBatches, TokenizedExamples, Trainable, pair_examples

    torch, transformers = _torch()
    model = bundled_reward_model(backbone, max_length, seed)
    pairs = hh_pairs(data)
    pairs = [
        pairs[i]
        for i in np.random.default_rng(seed).permutation(len(pairs))[: pairs_per_step * steps]
    ]
    tokens = TokenizedExamples.build(
        pair_examples(pairs, model.render), model.tokenizer, model.spec.max_length, 2
    )
    mesh = shd.make_mesh("", jax.devices()[:1])
    pad_id = model.tokenizer.pad_id
    order = ExampleBatches(
        tokens,
        seed=seed,
        batch_size=pairs_per_step,
        grad_accum=1,
        max_length=max_length,
        pad_id=pad_id,
    )  # the steps' pairs, every side
    step_texts = [
        np.stack([2 * order.indices(s), 2 * order.indices(s) + 1], 1).ravel() for s in range(steps)
    ]
    real = [int(tokens.texts.lengths[texts].sum()) for texts in step_texts]
    counts = [pairs_per_step] * steps
    results, computed = {}, {}
    for packing in (True, False):
        config = TrainConfig(
            steps=10_000,
            batch_size=pairs_per_step,
            max_length=max_length,
            learning_rate=1e-5,
            backbone=backbone,
            packing=packing,
        )
        trainable = Trainable.build(model.spec, config, mesh)
        batcher = ExampleBatches(
            tokens,
            seed=seed,
            batch_size=pairs_per_step,
            grad_accum=1,
            max_length=model.spec.max_length,
            pad_id=pad_id,
            packing=trainable.row_layout() if packing else None,
        )
        host = [batcher.batch(s) for s in range(steps)]
        padded = [int(np.prod(b["ids"].shape)) for b in host]
        batches = [trainable.global_batch(b) for b in host]
        step = trainable.train_step(config)
        holder = {"state": trainable.initial_state(model.params)}

        def run(batch, step=step, holder=holder):
            holder["state"], sums = step(holder["state"], batch)
            sums["loss"].block_until_ready()

        for batch in batches:  # compile every shape, then warm
            run(batch)
        name = "jax_packed" if packing else "jax_unpacked"
        results[name] = _rates(*_timed(run, batches, seconds), counts, real, padded)
        computed[name] = sorted({tuple(b["ids"].shape[1:]) for b in host})
        holder.clear()  # free the JAX state before the next side allocates its own

    with tempfile.TemporaryDirectory() as workdir:
        reference = _torch_model(torch, transformers, model, Path(workdir)).train()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-5, weight_decay=0.01)
    torch_batches = [
        _torch_padded(torch, tokens.texts.ids(texts.tolist()), pad_id) for texts in step_texts
    ]

    def torch_run(batch):
        ids, mask = batch
        rewards = reference(ids, mask).view(-1, 2)
        loss = -torch.nn.functional.logsigmoid(rewards[:, 0] - rewards[:, 1]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()

    torch_run(torch_batches[0])  # warm-up
    padded = [int(np.prod(ids.shape)) for ids, _ in torch_batches]
    results["torch_padded"] = _rates(
        *_timed(torch_run, torch_batches, seconds), counts, real, padded
    )
    return _report(
        "train",
        backbone,
        results,
        {
            "pairs_per_step": pairs_per_step,
            "steps": steps,
            "max_length": model.spec.max_length,
            "data": "HH-RLHF harmless-base test",
            "real_tokens_per_step": float(np.mean(real)),
            "jax_batch_shapes": {k: [list(v) for v in shapes] for k, shapes in computed.items()},
            "torch": torch.__version__,
            "threads": os.cpu_count(),
        },
    )


def _report(kind: str, backbone: str, results: dict, setup: dict) -> dict:
    torch_rate = results["torch_padded"]["pairs_per_s"]
    return {
        "benchmark": kind,
        "setup": {"model": MODEL_NAMES[backbone], **setup},
        "results": results,
        "ratios": {
            "packed_over_torch": results["jax_packed"]["pairs_per_s"] / torch_rate,
            "unpacked_over_torch": results["jax_unpacked"]["pairs_per_s"] / torch_rate,
            "packed_over_unpacked": results["jax_packed"]["pairs_per_s"]
            / results["jax_unpacked"]["pairs_per_s"],
        },
    }


def bench_score(
    *,
    backbone: str = "encoder",
    pairs: int = 256,
    batch_size: int = 64,
    max_length: int = 512,
    data: str | Path | None = None,
    seed: int = 0,
) -> dict:
    """Scoring pairs/s and real tokens/s (both texts of each pair) on HH harmless pairs: the JAX
    scorer with packed rows and with one text a row (both sort by length into buckets), against
    PyTorch + transformers with its usual batches (``batch_size`` texts in input order, padded
    to the longest). The decoder is scored from its exported directory on both sides (our import
    and transformers' ``AutoModelForSequenceClassification``), so the reward difference also
    checks the export."""
    import tempfile

    import jax

    from dynrules.models import classifier as mdl
    from dynrules.train import sharding as shd
    from dynrules.train.scoring import Scorer

    torch, transformers = _torch()
    model = bundled_reward_model(backbone, max_length, seed)
    chosen = np.random.default_rng(seed).permutation(len(everything := hh_pairs(data)))[:pairs]
    texts = [t for i in chosen for t in everything[i].texts(model.render)]
    mesh = shd.make_mesh("", jax.devices()[:1])
    results, rewards = {}, {}
    with tempfile.TemporaryDirectory() as workdir:
        reference = _torch_model(torch, transformers, model, Path(workdir)).eval()
        for packing in (True, False):
            if backbone == "decoder":
                scorer = Scorer.from_model_dir(
                    Path(workdir) / "model", batch_size=batch_size, packing=packing
                )
            else:
                graphdef, abstract = mdl.abstract_model(model.spec)
                params = shd.place(model.params, shd.abstract_params(abstract, mesh))
                scorer = Scorer(
                    graphdef,
                    params,
                    model.tokenizer,
                    mesh,
                    max_length=model.spec.max_length,
                    batch_size=batch_size,
                    packing=packing,
                )
            tokens = scorer.tokenizer.encode(texts, model.spec.max_length)
            scorer(texts)  # compile every program it needs
            started = time.perf_counter()
            name = "jax_packed" if packing else "jax_unpacked"
            rewards[name] = scorer.rewards(texts)
            seconds = time.perf_counter() - started
            padded = sum(b.rows * b.width for b in scorer.plan(tokens.lengths))
            results[name] = _rates(seconds, [0], [pairs], [int(tokens.lengths.sum())], [padded])
    batches = [
        _torch_padded(torch, tokens.ids[i : i + batch_size], scorer.tokenizer.pad_id)
        for i in range(0, len(texts), batch_size)
    ]
    out = []
    with torch.inference_mode():
        reference(*batches[0])  # warm-up
        started = time.perf_counter()
        for ids, mask in batches:
            out.append(reference(ids, mask).numpy())
        seconds = time.perf_counter() - started
    padded = sum(int(np.prod(ids.shape)) for ids, _ in batches)
    results["torch_padded"] = _rates(seconds, [0], [pairs], [int(tokens.lengths.sum())], [padded])
    torch_rewards = np.concatenate(out)
    report = _report(
        "score",
        backbone,
        results,
        {
            "pairs": pairs,
            "batch_size": batch_size,
            "max_length": model.spec.max_length,
            "data": "HH-RLHF harmless-base test",
            "real_tokens": int(tokens.lengths.sum()),
            "threads": os.cpu_count(),
            "torch": torch.__version__,
        },
    )
    report["max_reward_difference"] = {
        "packed_vs_torch": float(np.abs(rewards["jax_packed"] - torch_rewards).max()),
        "packed_vs_unpacked": float(np.abs(rewards["jax_packed"] - rewards["jax_unpacked"]).max()),
    }
    report["reward_std"] = float(np.std(torch_rewards))
    return report


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
    dtype: Dtype,
    param_dtype: Dtype,
    remat: Remat,
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
    config = TrainConfig(
        steps=10_000,
        batch_size=pairs_per_step,
        max_length=seq,
        dtype=dtype,
        param_dtype=param_dtype,
        remat=remat,
        backbone="decoder",
        packing=False,
    )  # full-length rows: nothing to pack; keeps cuDNN
    spec = mdl.ModelSpec(backbone, max_length=seq)
    trainable = Trainable.build(spec, config, shd.make_mesh("", jax.devices()[:1]))
    width = backbone.hidden_size

    def init():
        model = mdl.Classifier(
            spec, rngs=nnx.Rngs(seed), param_dtype=mdl.COMPUTE_DTYPES[param_dtype]
        )
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        # A head of std 1/√width gives rewards of order one, so that differences mean something.
        head = jax.random.normal(jax.random.key(seed + 1), params["head_kernel"].shape)
        return params | {"head_kernel": (head * width**-0.5).astype(params["head_kernel"].dtype)}

    params = jax.jit(init, out_shardings=trainable.state_shardings["params"])()
    return backbone, trainable, trainable.initial_state(params), trainable.train_step(config)


def _random_batch(trainable, vocab_size: int, pairs_per_step: int, seq: int, seed: int) -> dict:
    """Full-length random token ids (no padding), one micro-batch."""
    rng = np.random.default_rng(seed)
    return trainable.global_batch(
        {
            "ids": rng.integers(1, vocab_size, (1, pairs_per_step, 2, seq)).astype(np.int32),
            "lengths": np.full((1, pairs_per_step, 2), seq, np.int32),
            "margins": np.zeros((1, pairs_per_step), np.float32),
        }
    )


def bench_train_mfu(
    *,
    preset: str = "llama-3.2-1b",
    seq: int = 2048,
    pairs_per_step: int = 4,
    steps: int = 10,
    dtype: Dtype = "bfloat16",
    param_dtype: Dtype = "float32",
    remat: Remat = "full",
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
        torch_rate, torch_error = _torch_rate_in_child(
            preset, seq=seq, pairs_per_step=pairs_per_step, steps=steps, dtype=dtype, remat=remat
        )
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
    result: dict[str, Any] = {
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
        },
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
    elif against_torch and torch_rate is not None:  # no error: a rate
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


def torch_train_tokens_per_s(
    backbone, *, seq: int, pairs_per_step: int, steps: int, dtype: str, remat: str
) -> float:
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


def bench_bf16_numerics(
    *,
    preset: str = "llama-3.2-1b",
    seq: int = 512,
    pairs_per_step: int = 4,
    steps: int = 20,
    batches: int = 4,
) -> dict:
    """bf16 compute against float32 compute (highest matmul precision, no TF32), from the same
    float32 master weights over the same batches: rewards before training, then the training
    loss step by step."""
    import jax

    from dynrules.models import classifier as mdl

    runs = {}
    dtypes: tuple[Dtype, ...] = ("float32", "bfloat16")
    for dtype in dtypes:
        with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
            backbone, trainable, state, step = _random_decoder(
                preset, seq, pairs_per_step, dtype=dtype, param_dtype="float32", remat="full"
            )
            data = [
                _random_batch(trainable, backbone.vocab_size, pairs_per_step, seq, seed=i)
                for i in range(batches)
            ]
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
        },
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
