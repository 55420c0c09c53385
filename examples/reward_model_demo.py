"""Reward model integration demo: score the policy's completions with a reward model batch by batch and watch
its reliability (stability, consistency, variance, mean reward), anomalies and recommendations — then simulate
reward hacking (scores jump although the completions did not get better) and see it flagged.

Offline by default: the tiny local GPT-2 is the policy, and a sequence-classification head on the same tiny
model (untrained, seeded) is the reward model, so its scores mean nothing but the monitoring is real.
    python examples/reward_model_demo.py --fast
    python examples/reward_model_demo.py --model gpt2 --reward-model OpenAssistant/reward-model-deberta-v3-large-v2
In training, `monitor_rewards([...], callback)` does the same for every batch (see trl_integration_example.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="policy: hub id or local folder (default: tiny GPT-2)")
    parser.add_argument(
        "--reward-model",
        default=None,
        help="sequence-classification reward model (default: an untrained head on the policy)",
    )
    parser.add_argument("--batches", type=int, default=None, help="healthy batches (default 20; 6 with --fast)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="where the reward log goes (default: a temp dir)")
    parser.add_argument("--fast", action="store_true", help="a few batches only (tests, smoke checks)")
    return parser.parse_args(argv)


def load_models(policy_name: str, reward_name: str | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_name)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    policy = AutoModelForCausalLM.from_pretrained(policy_name).eval()
    torch.manual_seed(0)  # the default reward head is random: seed it so runs repeat
    reward_tok = AutoTokenizer.from_pretrained(reward_name) if reward_name else tok
    if reward_tok.pad_token is None:
        reward_tok.pad_token = reward_tok.eos_token
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_name or policy_name, num_labels=1).eval()
    reward_model.config.pad_token_id = reward_tok.pad_token_id
    return tok, policy, reward_tok, reward_model


def generate(tok, policy, prompts: list[str], max_new_tokens: int) -> list[str]:
    import torch

    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = policy.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=True, top_k=0, pad_token_id=tok.pad_token_id
        )
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def score(reward_tok, reward_model, prompts: list[str], completions: list[str]) -> list[float]:
    import torch

    enc = reward_tok(
        [p + c for p, c in zip(prompts, completions)],
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=512,
    )
    with torch.no_grad():
        return reward_model(**enc).logits[:, 0].float().tolist()


def main(argv=None) -> int:
    ns = parse_args(argv)
    if ns.model is None and ns.reward_model is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rlhf_tui.bridge.demo.tiny import quiet_libraries

    quiet_libraries()
    import random

    import numpy as np

    from rlhf_tui.analysis.rewards import RewardModelIntegrator
    from rlhf_tui.bridge.demo.tiny import PROMPTS, build_tiny_model

    workdir = ns.workdir or tempfile.mkdtemp(prefix="rlhf-tui-rewards-")
    healthy = ns.batches or (6 if ns.fast else 20)
    hacked = 3 if ns.fast else 6
    policy_name = ns.model or build_tiny_model()
    if ns.model is None:
        import torch

        torch.set_num_threads(1)  # a tiny model is overhead-bound: extra threads only contend
    tok, policy, reward_tok, reward_model = load_models(policy_name, ns.reward_model)
    integrator = RewardModelIntegrator(log_dir=os.path.join(workdir, "logs", "rewards"))
    rng = random.Random(0)

    # The guide's call, as is.
    analysis = integrator.monitor_reward_model(
        reward_scores=[2.1, 2.3, 1.9, 2.0, 2.2], step=100, context={"batch_id": "batch_001"}
    )
    print("== the guide's example batch ==")
    print(f"Stability: {analysis['reliability_metrics']['stability']:.2f}")
    print(f"Consistency: {analysis['reliability_metrics']['consistency']:.2f}")
    integrator.reset()

    print(
        f"\n== scoring the policy's completions with the reward model ({healthy} healthy batches, then "
        f"{hacked} with simulated reward hacking) =="
    )
    print(f"{'step':>4} {'phase':<8} {'mean':>8} {'stability':>9} {'consistency':>11} {'variance':>9}  anomalies")
    offset = None
    recommendations: list[str] = []
    for step in range(healthy + hacked):
        prompts = [rng.choice(PROMPTS) for _ in range(ns.batch_size)]
        completions = generate(tok, policy, prompts, max_new_tokens=8 if ns.model is None else 24)
        scores = score(reward_tok, reward_model, prompts, completions)
        phase = "healthy"
        if step >= healthy:
            # Reward hacking: the policy found something the reward model over-rates, so scores jump by many
            # standard deviations while the completions are no better.
            offset = offset if offset is not None else 8.0 * (float(np.std(scores)) or 1.0)
            scores = [s + offset for s in scores]
            phase = "hacked"
        result = integrator.monitor_reward_model(scores, step, context={"batch_id": f"batch_{step:03d}"})
        rel = result["reliability_metrics"]
        recommendations += [r for r in result["recommendations"] if r not in recommendations]
        flagged = "; ".join(f"{a['severity']} {a['detector']}" for a in result["anomalies"]) or "-"
        print(
            f"{step:>4} {phase:<8} {result['batch_mean']:>8.3f} {rel['stability']:>9.2f} "
            f"{_num(rel['consistency']):>11} {_num(rel['variance']):>9}  {flagged}"
        )

    final = integrator.last_result
    print("\n== reliability after the run ==")
    for key in ("stability", "consistency", "variance", "mean_reward"):
        print(f"{key}: {_num(final['reliability_metrics'][key])}")
    print("Recommendations (during the run):")
    for rec in recommendations or ["none"]:
        print(f"  - {rec}")
    print(f"\nreward log: {integrator.log_dir}")
    return 0


def _num(value) -> str:
    return "—" if value is None else f"{value:.3g}"


if __name__ == "__main__":
    sys.exit(main())
