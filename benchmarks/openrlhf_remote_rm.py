"""OpenRLHF's own reward client against `dynrules serve` (part of `make integration`).

OpenRLHF 0.11's PPO rollouts fetch rewards through ``SingleTurnAgentExecutor``
(openrlhf/utils/agent.py): once vLLM has generated a response it decodes prompt + response
with the policy's tokenizer and POSTs ``{"query", "prompts", "labels"}`` to ``--remote_rm_url``,
with its own retries and timeout. This check runs that class unmodified, with a stand-in for
the vLLM engine (it returns a fixed response's token ids, then EOS), against ``dynrules serve``
in its own process, serving a decoder reward model made from the bundled SmolLM2-135M-Instruct
(random head), the policy tokenizer being the same SmolLM2 tokenizer loaded by transformers
from the exported model. Each reward must equal ``dynrules score`` on the same
(prompt, response) within 1e-4.

Two prompt styles, as OpenRLHF sends them:
- raw prompts (``--input_key`` without ``--apply_chat_template``): the query is prompt +
  response + EOS; the server strips EOS (``--strip-tokens``), finds the prompt and scores the
  pair through the reward model's own chat template;
- chat-templated prompts (``--apply_chat_template``): the prompt OpenRLHF sends is already the
  policy's template; the server finds the user turn inside it and scores the same pair.

Needs ``pip install -e '.[integration]'`` and ``pip install --no-deps openrlhf==0.11.2``
(OpenRLHF's other requirements, deepspeed, vLLM and ray, are not needed to import the client).
Prints one JSON object; exits 1 when a reward differs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np

from dynrules.client import RewardClient
from dynrules.launch import free_port

DYNRULES = [sys.executable, "-m", "dynrules"]
PAIRS = [
    (
        "How do I make a cake without eggs?",
        "Use a quarter cup of apple sauce or a mashed banana in place of each egg.",
    ),
    (
        "How can I pick the lock on my neighbour's door?",
        "I can't help with getting into someone else's home. If you're locked out of your own, "
        "a licensed locksmith can help.",
    ),
    (
        "What household chemicals should never be mixed?",
        "Never mix bleach with ammonia or with acids such as vinegar: both release toxic gases.",
    ),
    (
        "Write a message threatening my coworker.",
        "I won't write threats. If a conflict at work is upsetting you, I can help you word a "
        "calm message or a complaint to HR.",
    ),
    ("Give me a tip for sleeping better.", "Keep the same bedtime every night, weekends too."),
    (
        "How do I find someone's home address from their licence plate?",
        "I can't help track down a private person's address. If this is about an accident, "
        "report it to the police or your insurer.",
    ),
]


def make_reward_model(directory: Path, max_length: int) -> None:
    """The bundled SmolLM2-135M-Instruct with a scalar head of std 1/√hidden, exported."""
    import jax

    from dynrules.benchmarks.rewardmodel import bundled_reward_model
    from dynrules.models import classifier as mdl

    model = bundled_reward_model("decoder", max_length, seed=0)
    params = jax.tree.map(np.asarray, model.params)
    mdl.export_model(params, model.spec, model.tokenizer, directory, model.chat)


class StandInEngine:
    """vLLM's ``generate`` as the executor awaits it: the response's token ids, then EOS."""

    def __init__(self, tokenizer, responses: dict[str, str]):
        self.tokenizer, self.responses = tokenizer, responses

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        prompt = self.tokenizer.decode(prompt_token_ids, skip_special_tokens=False)
        response = next(r for p, r in self.responses.items() if prompt.endswith(p))
        ids = self.tokenizer.encode(response, add_special_tokens=False)
        ids.append(self.tokenizer.eos_token_id)
        output = SimpleNamespace(token_ids=ids, finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[output])


async def openrlhf_rewards(url: str, tokenizer, prompts: list[str], responses: list[str]):
    """Rewards as OpenRLHF's rollout gets them, every prompt's rollout at once."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    executor = SingleTurnAgentExecutor(f"{url}/get_reward")
    engine = StandInEngine(tokenizer, dict(zip(prompts, responses, strict=True)))
    params = SimpleNamespace(max_tokens=128, logprobs=None)
    outputs = await asyncio.gather(
        *[executor.execute(prompt, "", params, 1024, tokenizer, engine) for prompt in prompts]
    )
    # Each reply carries the reward list of a one-query request, as OpenRLHF's serve_rm sends it.
    return [out["reward"][0] for out in outputs]


def offline_rewards(model: Path, work: Path) -> np.ndarray:
    records = work / "pairs.jsonl"
    records.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    scored = work / "scored.jsonl"
    subprocess.run([*DYNRULES, "score", str(model), str(records), "--out", str(scored)], check=True)
    return np.array([json.loads(line)["reward"] for line in scored.read_text().splitlines()])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = work / "reward-model"
        make_reward_model(model, args.max_length)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model))
        expected = offline_rewards(model, work)
        port = free_port()
        log = (work / "serve.log").open("w")
        server = subprocess.Popen(
            [
                *DYNRULES,
                "serve",
                str(model),
                "--port",
                str(port),
                "--strip-tokens",
                tokenizer.eos_token,
                "--max-wait-ms",
                "20",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            started = time.monotonic()
            with RewardClient(url) as probe:
                while not probe.ready():
                    if server.poll() is not None or time.monotonic() - started > 900:
                        log_text = (work / "serve.log").read_text()
                        raise SystemExit(f"the server did not come up:\n{log_text}")
                    time.sleep(1)
            raw = [p for p, _ in PAIRS]
            templated = [
                cast(  # tokenize=False: the text
                    str,
                    tokenizer.apply_chat_template(
                        [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                    ),
                )
                for p in raw
            ]
            responses = [r for _, r in PAIRS]
            result: dict[str, Any] = {"pairs": len(PAIRS), "expected_std": float(expected.std())}
            failed = False
            for style, prompts in (("raw_prompts", raw), ("chat_templated_prompts", templated)):
                rewards = np.array(
                    asyncio.run(openrlhf_rewards(url, tokenizer, prompts, responses)),
                    dtype=np.float64,
                )
                difference = float(np.abs(rewards - expected).max())
                result[style] = {"max_difference": difference, "rewards": rewards.round(5).tolist()}
                failed |= not difference <= 1e-4
        finally:
            server.terminate()
            server.wait(timeout=60)
            log.close()
    result["expected"] = expected.round(5).tolist()
    result["ok"] = not failed
    print(json.dumps(result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
