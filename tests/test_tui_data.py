"""Deterministic monitor data shared by the TUI tests (fixed run id, no clocks), and the helpers that wait for
the app to settle. The tests here check the data itself."""

from __future__ import annotations

import math

from conftest import pilot_wait_for

from rlhf_tui.analysis.store import Store

RUN_ID = "grpo-demo-0001"
INJECTION = "The answer is [red]forty-two[/red]\x1b[31m!\x1b]0;pwned\x07 done"


def make_store(
    steps: int = 200,
    *,
    run_id: str = RUN_ID,
    gpu: bool = True,
    ranks: int = 1,
    kl_jump_at: int = 170,
    connection: str = "live",
) -> Store:
    """A GRPO-like run with a KL spike at step 120 and a KL level jump from `kl_jump_at`, a grad_norm spike,
    two checkpoints (one unhealthy), a reward batch with hostile sample text and GPU samples."""
    store = Store()
    store.source = "tcp://127.0.0.1:5555"
    store.connection = connection
    with store.lock:
        run = store.run(run_id)
        run.meta.update(
            {
                "run_id": run_id,
                "trainer": "GRPOTrainer",
                "model": "tiny-gpt2",
                "max_steps": 300,
                "args": {"beta": 0.04, "num_generations": 4, "max_completion_length": 16},
            }
        )
        for s in range(1, steps + 1):
            kl = 0.01 + 0.002 * math.sin(s / 7) + (0.8 if s == 120 else 0.0) + (0.3 if s >= kl_jump_at else 0)
            reward = 0.2 + 0.003 * s + 0.05 * math.sin(s / 5)
            run.add_step(
                s,
                {
                    "reward": reward,
                    "reward_std": 0.3 + 0.02 * math.cos(s / 3),
                    "kl": kl,
                    "entropy": 2.0 - 0.004 * s + 0.02 * math.sin(s),
                    "loss": 0.05 * math.sin(s / 4),
                    "grad_norm": 1.0 + 0.1 * math.cos(s / 2) + (8.0 if s == 150 else 0),
                    "learning_rate": 5e-5,
                    "completion_length": 12 + 2 * math.sin(s / 9),
                    "completions/clipped_ratio": 0.1,
                    "rewards/length_reward/mean": reward,
                },
            )
        run.checkpoints.append(
            {
                "step": 100,
                "path": "/runs/out/checkpoint-100",
                "health_score": 0.93,
                "issues": [],
                "recommendations": [],
                "drift": None,
                "file_size_mb": 4.2,
                "status": "analysed",
            }
        )
        run.checkpoints.append(
            {
                "step": 200,
                "path": "/runs/out/checkpoint-200",
                "health_score": 0.41,
                "issues": ["3 tensors with exploding weight norm [bold]x[/bold]"],
                "recommendations": ["roll back to checkpoint-100 and lower the learning rate"],
                "drift": {"overall": 0.081},
                "file_size_mb": 4.2,
                "status": "analysed",
            }
        )
        run.rewards.append(
            {
                "step": 200,
                "scores": [0.1, 0.5, 0.9, 0.3],
                "samples": [
                    {"label": "best", "score": 0.9, "prompt": "p", "completion": INJECTION},
                    {"label": "worst", "score": 0.1, "prompt": "p", "completion": "no\nnewline\ttab"},
                ],
            }
        )
        run.reward_report = {
            "reliability_metrics": {"stability": 0.91, "consistency": 0.97, "variance": 0.02, "mean_reward": 0.62},
            "drift": {"psi": 0.03, "level": "none"},
            "histogram": {"counts": [1, 3, 7, 12, 9, 4, 1], "edges": [-0.1, 0.1, 0.3, 0.5, 0.7, 0.9, 1.1, 1.3]},
        }
        for rank in range(ranks):
            run.system[rank] = {
                "rank": rank,
                "rss_mb": 812.0 + rank,
                "gpu_available": gpu,
                "gpus": [
                    {
                        "index": i,
                        "name": "NVIDIA H100 80GB HBM3",
                        "used_mb": 41200.0 + 1000 * i,
                        "total_mb": 81559.0,
                        "util": 87.0,
                        "peak_used_mb": 60100.0,
                    }
                    for i in range(2 if ranks > 1 else 1)
                ]
                if gpu
                else [],
            }
        store.transport["received"] = steps
        store.touch()
    return store


async def settle(pilot, app, detections: int = 1, timeout: float = 10.0) -> None:
    """Wait until every view ran anomaly detection and drew the result."""

    def ready():
        view = app.view  # only the active tab draws
        return (
            all(v.detect_count >= detections and not v.detecting for v in app.views)
            and not view.busy
            and bool(view.report)
        )

    await pilot_wait_for(pilot, ready, timeout=timeout, message="views settled")
    await pilot.pause()


def title(widget) -> str:
    """A pane's border title as plain text (Textual keeps it as Content)."""
    content = widget._border_title
    return content.plain if content is not None else ""


def cell(table, row_key: str, column: int) -> str:
    return str(table.get_row(row_key)[column])


def test_the_data_has_what_the_panes_need():
    store = make_store()
    run = store.current_run
    assert run.rows == 200 and run.last_step == 200
    assert len(run.checkpoints) == 2 and run.rewards and run.system[0]["gpus"]
    assert make_store(gpu=False).current_run.system[0]["gpus"] == []
