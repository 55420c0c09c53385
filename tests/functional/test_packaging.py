"""Layout and imports: one namespace, a light monitor side, no shadowing by a user's own modules."""

import subprocess
import sys


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_monitor_side_imports_no_torch_transformers_or_trl(tmp_path):
    code = (
        "import sys, rlhf_tui.tui.app, rlhf_tui.tui.cli, rlhf_tui.tui.render, rlhf_tui.analysis.report, "
        "rlhf_tui.analysis.store, rlhf_tui.bridge.monitor.subscriber, rlhf_tui.bridge.monitor.sources, rlhf_tui.bridge;"
        "heavy = [m for m in ('torch', 'transformers', 'trl') if m in sys.modules]; print(heavy)"
    )
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_users_own_analysis_and_bridge_cannot_shadow_ours(tmp_path):
    (tmp_path / "analysis.py").write_text("raise SystemExit('shadowed')\n")
    (tmp_path / "bridge").mkdir()
    (tmp_path / "bridge" / "__init__.py").write_text("raise SystemExit('shadowed')\n")
    result = _run(
        "import rlhf_tui.bridge, rlhf_tui.analysis; from rlhf_tui.bridge import RLHFMonitorCallback, "
        "PPOMonitoringCallback, monitor_rewards; assert PPOMonitoringCallback is RLHFMonitorCallback; "
        "from rlhf_tui.analysis import CheckpointAnalyzer, RewardModelIntegrator; print('ok')",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_callback_is_a_transformers_trainer_callback():
    from transformers import TrainerCallback

    from rlhf_tui.bridge import RLHFMonitorCallback

    assert issubclass(RLHFMonitorCallback, TrainerCallback)
