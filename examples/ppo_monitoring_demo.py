"""PPO-specific monitoring demo on today's TRL (which has no PPOTrainer since 1.13): a small hand-written PPO loop
(clipped policy loss, clipped value head, GAE, adaptive KL controller — the guide's PPO fields) on a causal LM,
monitored with the guide's callback calls, then the guide's PPO metrics, ratios, trends and epoch statistics.

The loop logs TRL ≤ 0.11's `stats` keys (objective/kl, ppo/loss/policy, ppo/loss/value, ppo/policy/clipfrac,
ppo/mean_scores …), so the same monitoring works for a legacy `PPOTrainer.step()` loop unchanged.
Offline by default on a tiny local GPT-2:
    python examples/ppo_monitoring_demo.py --fast
    python examples/ppo_monitoring_demo.py --model gpt2 --steps 30
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the tiny local GPT-2)")
    parser.add_argument("--steps", type=int, default=None, help="PPO steps (default 30; 8 with --fast)")
    parser.add_argument("--workdir", default=None, help="where the JSONL log goes (default: a temp dir)")
    parser.add_argument(
        "--address", default=False, help="publish live to this address (e.g. tcp://127.0.0.1:5555); default: log only"
    )
    parser.add_argument("--fast", action="store_true", help="a few steps only (tests, smoke checks)")
    return parser.parse_args(argv)


class AdaptiveKLController:
    """The legacy PPO controller (Ziegler et al. 2019) that `adap_kl_ctrl`, `target` and `horizon` configure."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x, mask):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * (var + 1e-8).rsqrt() * mask


def response_forward(model, seq, attention_mask, prompt_len: int, v_head=None):
    """(log-probs, values or None, entropy) of the response tokens seq[:, prompt_len:]; `v_head` is the scalar
    value head on the last hidden state (what TRL's AutoModelForCausalLMWithValueHead added)."""
    import torch

    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding
    out = model(
        input_ids=seq, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=v_head is not None
    )
    logits = out.logits[:, prompt_len - 1 : -1].float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, seq[:, prompt_len:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    values = v_head(out.hidden_states[-1][:, prompt_len - 1 : -1]).squeeze(-1) if v_head is not None else None
    return logp, values, entropy


def ppo_step(cfg, model, v_head, ref_model, optimizer, tok, prompts, reward_fn, kl_ctl, max_new_tokens: int):
    """One legacy-PPO step: rollout, score, GAE, `ppo_epochs` passes of clipped updates.
    Returns (stats with TRL ≤ 0.11's keys, scores, completion texts)."""
    import torch

    enc = tok(prompts, return_tensors="pt", padding=True)
    prompt_len = enc["input_ids"].shape[1]
    with torch.no_grad():
        seq = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=True,
            top_k=0,
            pad_token_id=tok.pad_token_id,
        )
    attention = torch.cat([enc["attention_mask"], torch.ones_like(seq[:, prompt_len:])], dim=1)
    mask = torch.ones_like(seq[:, prompt_len:], dtype=torch.float)
    texts = tok.batch_decode(seq[:, prompt_len:], skip_special_tokens=True)
    scores = torch.tensor(reward_fn(texts), dtype=torch.float)

    with torch.no_grad():
        old_logp, old_values, _ = response_forward(model, seq, attention, prompt_len, v_head)
        ref_logp, _, _ = response_forward(ref_model, seq, attention, prompt_len)
    kl = old_logp - ref_logp
    rewards = -kl_ctl.value * kl
    rewards[:, -1] += scores
    # Generalised advantage estimation over the response tokens (gamma, lam).
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        next_value = old_values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + cfg.gamma * next_value - old_values[:, t]
        last = delta + cfg.gamma * cfg.lam * last
        advantages[:, t] = last
    returns = advantages + old_values
    advantages = whiten(advantages, mask)

    params = list(model.parameters()) + list(v_head.parameters())
    collected: dict[str, list[float]] = {}
    batch = len(prompts)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(batch)
        for start in range(0, batch, cfg.mini_batch_size):
            idx = order[start : start + cfg.mini_batch_size]
            logp, values, entropy = response_forward(model, seq[idx], attention[idx], prompt_len, v_head)
            m = mask[idx]
            ratio = torch.exp(logp - old_logp[idx])
            pg_losses = -advantages[idx] * ratio
            pg_losses2 = -advantages[idx] * torch.clamp(ratio, 1 - cfg.cliprange, 1 + cfg.cliprange)
            pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), m)
            v_clipped = old_values[idx] + torch.clamp(
                values - old_values[idx], -cfg.cliprange_value, cfg.cliprange_value
            )
            vf_losses = torch.max((values - returns[idx]) ** 2, (v_clipped - returns[idx]) ** 2)
            vf_loss = 0.5 * masked_mean(vf_losses, m)
            loss = pg_loss + cfg.vf_coef * vf_loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                for key, value in {
                    "ppo/loss/policy": pg_loss,
                    "ppo/loss/value": vf_loss,
                    "ppo/loss/total": loss,
                    "ppo/policy/entropy": masked_mean(entropy, m),
                    "ppo/policy/approxkl": 0.5 * masked_mean((logp - old_logp[idx]) ** 2, m),
                    "ppo/policy/policykl": masked_mean(old_logp[idx] - logp, m),
                    "ppo/policy/clipfrac": masked_mean((pg_losses2 > pg_losses).float(), m),
                    "ppo/val/vpred": masked_mean(values, m),
                    "ppo/val/error": masked_mean((values - returns[idx]) ** 2, m),
                    "ppo/val/clipfrac": masked_mean(
                        ((values - returns[idx]) ** 2 < (v_clipped - returns[idx]) ** 2).float(), m
                    ),
                }.items():
                    collected.setdefault(key, []).append(float(value))

    mean_kl = float((kl * mask).sum(-1).mean())
    kl_ctl.update(mean_kl, batch)
    var_returns = float(returns.var())
    stats = {key: sum(v) / len(v) for key, v in collected.items()}
    stats.update(
        {
            "objective/kl": mean_kl,
            "objective/kl_coef": kl_ctl.value,
            "objective/entropy": float((-old_logp * mask).sum(-1).mean()),
            "ppo/mean_scores": float(scores.mean()),
            "ppo/std_scores": float(scores.std()),
            "env/reward_mean": float(scores.mean()),
            "env/reward_std": float(scores.std()),
            "ppo/val/var_explained": 1 - stats["ppo/val/error"] / var_returns if var_returns > 0 else 0.0,
            "ppo/learning_rate": optimizer.param_groups[0]["lr"],
        }
    )
    return stats, scores.tolist(), texts


# The guide's metric names -> rlhf-tui's canonical names (what the legacy keys are normalised to).
SEED_NAMES = {
    "kl_div": "kl",
    "policy_loss": "policy_loss",
    "value_loss": "value_loss",
    "reward": "reward",
    "clip_ratio": "clip_ratio",
    "entropy": "entropy",
}


def main(argv=None) -> int:
    ns = parse_args(argv)
    if ns.model is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rlhf_tui.bridge.demo.tiny import quiet_libraries

    quiet_libraries()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_tui.analysis.report import build_report
    from rlhf_tui.analysis.trends import derived_ratios, epoch_statistics, trend
    from rlhf_tui.bridge import PPOMonitoringCallback, TRLIntegrationConfig
    from rlhf_tui.bridge.demo.tiny import PROMPTS, build_tiny_model, length_reward
    from rlhf_tui.bridge.monitor.sources import load_file_source

    workdir = ns.workdir or tempfile.mkdtemp(prefix="rlhf-tui-ppo-")
    steps = ns.steps or (8 if ns.fast else 30)
    model_name = ns.model or build_tiny_model()
    if ns.model is None:
        torch.set_num_threads(1)  # a tiny model is overhead-bound: extra threads only contend
    torch.manual_seed(0)
    rng = random.Random(0)

    # The guide's PPO fields: TRL's GRPO/RLOO ignore most of them, a PPO loop of your own uses them all.
    cfg = TRLIntegrationConfig(
        model_name=model_name,
        learning_rate=1e-3 if ns.model is None else 1e-5,
        batch_size=8,
        mini_batch_size=4,
        ppo_epochs=2,
        init_kl_coef=0.2,
        adap_kl_ctrl=True,
        target=6.0,
        horizon=10000.0,
        log_with="none",
    )
    tok = AutoTokenizer.from_pretrained(model_name)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_name)
    model.config.pad_token_id = tok.pad_token_id
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    for module in (model, ref_model):  # dropout off: KL starts at 0 and ratios at 1, as in TRL
        for sub in module.modules():
            if isinstance(sub, torch.nn.Dropout):
                sub.p = 0.0
    v_head = torch.nn.Linear(model.config.hidden_size, 1)
    torch.nn.init.normal_(v_head.weight, std=0.01)
    torch.nn.init.zeros_(v_head.bias)
    optimizer = torch.optim.Adam(list(model.parameters()) + list(v_head.parameters()), lr=cfg.learning_rate)
    kl_ctl = (
        AdaptiveKLController(cfg.init_kl_coef, cfg.target, cfg.horizon)
        if cfg.adap_kl_ctrl
        else FixedKLController(cfg.init_kl_coef)
    )

    callback = PPOMonitoringCallback(
        anomaly_threshold=cfg.anomaly_detection_threshold,
        log_dir=os.path.join(workdir, "logs", "callbacks"),
        enable_detailed_logging=True,
        address=ns.address,
    )
    print(
        f"== {steps} PPO steps on {model_name} (batch {cfg.batch_size}, mini-batch {cfg.mini_batch_size}, "
        f"{cfg.ppo_epochs} epochs, cliprange {cfg.cliprange}, adaptive KL from {cfg.init_kl_coef}) =="
    )
    dataset = PROMPTS * 2  # one epoch = one pass over these prompts (4 steps of 8)
    order: list[str] = []
    for step in range(1, steps + 1):
        callback.on_step_begin(step, {})
        if len(order) < cfg.batch_size:
            order += rng.sample(dataset, len(dataset))
        prompts, order = order[: cfg.batch_size], order[cfg.batch_size :]
        stats, scores, texts = ppo_step(
            cfg,
            model,
            v_head,
            ref_model,
            optimizer,
            tok,
            prompts,
            length_reward,
            kl_ctl,
            max_new_tokens=8 if ns.model is None else 24,
        )
        stats["epoch"] = step * cfg.batch_size / len(dataset)
        callback.on_step_end(step, stats)  # the guide's manual call; same as callback.log_step(step, stats)
        callback.log_rewards(
            step,
            scores,
            [{"label": "random", "score": scores[0], "prompt": prompts[0], "completion": texts[0]}],
            name="length_reward",
        )
        print(
            f"step {step:>3}: objective/kl={stats['objective/kl']:.4f} ppo/loss/policy="
            f"{stats['ppo/loss/policy']:.4f} ppo/loss/value={stats['ppo/loss/value']:.4f} "
            f"ppo/policy/clipfrac={stats['ppo/policy/clipfrac']:.3f} ppo/mean_scores={stats['ppo/mean_scores']:.3f}"
        )
    callback.close()

    # Read back what the callback logged (the same data a live monitor gets) and analyse it.
    store = load_file_source(callback.log_path)
    report = build_report(store)
    run = store.current_run
    series = {ours: run.values(ours) for ours in SEED_NAMES.values()}
    last = {ours: report["metrics"].get(ours, {}).get("last") for ours in SEED_NAMES.values()}
    ppo_metrics = {**{seed: last[ours] for seed, ours in SEED_NAMES.items()}, **derived_ratios(last)}
    print("\n== PPO metrics (last step, the guide's names) ==")
    for name, value in ppo_metrics.items():
        print(f"  {name:<20} {_num(value)}")
    print("\n== trend analysis ==")
    for seed, ours in SEED_NAMES.items():
        print(f"  {seed:<20} {trend(series[ours])}")
    print("\n== epoch statistics ==")
    for epoch in epoch_statistics(run.steps, {**series, "epoch": run.values("epoch")}):
        print(f"  epoch {epoch['epoch']} (steps {epoch['first_step']}-{epoch['last_step']}):")
        for seed, ours in SEED_NAMES.items():
            row = epoch["metrics"][ours]
            print(
                f"    {seed:<12} mean={_num(row['mean'])} std={_num(row['std'])} min={_num(row['min'])} "
                f"max={_num(row['max'])} trend={row['trend']}"
            )
    anomalies = report["anomalies"]
    print(f"\nanomalies: {len(anomalies)}")
    for a in anomalies[:5]:
        print(f"  step {a.get('step')} {a.get('severity')} {a.get('metric')}: {a.get('message')}")
    print(f"\nlog: {callback.log_path}\nthe same view: rlhf-tui report {callback.log_path}")
    return 0


def _num(value) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


if __name__ == "__main__":
    sys.exit(main())
