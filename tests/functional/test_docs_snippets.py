"""Every Python snippet of docs/trl-integration.md is marked, and the runnable ones run: top to bottom, in one
folder and one namespace (like a reader following the guide), offline.

Markers (an HTML comment on the line before the fence):
  <!-- test: run -->               executed; `"gpt2"` -> the tiny local model, `"imdb"` -> a local JSONL file
  <!-- test: skip (reason) -->     not run (GPU, network, an old TRL); reported as a skipped test with the reason
  <!-- test: config -->            the TRLIntegrationConfig listing, compared with the class
  <!-- test: json -->              a JSON example, parsed and compared with a real log event
  <!-- test: mapping table -->     the mapping table, compared with integration.MAPPING
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import textwrap
from dataclasses import dataclass

import pytest
from conftest import REPO, free_address

DOC = REPO / "docs" / "trl-integration.md"
MARKER = re.compile(r"^\s*<!--\s*test:\s*(?P<kind>[a-z ]+?)\s*(?:\((?P<reason>[^)]*)\))?\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[a-z]*)\s*$")

# The guide's Basic Usage, verbatim (from the RLHF Systems Kit): ours may differ in the import line only.
SEED_BASIC_USAGE = """
from rlhf_core.trl_integration import TRLIntegrationConfig, TRLIntegrationManager

# Configure integration
config = TRLIntegrationConfig(
    model_name="gpt2",
    learning_rate=1e-5,
    batch_size=4,
    enable_profiling=True,
    enable_checkpoint_analysis=True,
    enable_reward_monitoring=True
)

# Initialize manager
integration_manager = TRLIntegrationManager(config)

# Setup TRL trainer
trainer = integration_manager.setup_trl_trainer(
    model_name="gpt2",
    dataset_name="imdb"
)

# Train with comprehensive monitoring
results = integration_manager.train_with_monitoring(
    num_steps=100,
    save_checkpoints=True
)
"""


@dataclass
class Snippet:
    lang: str
    code: str
    line: int
    kind: str | None
    reason: str | None
    table: list[str] | None = None


def parse(text: str) -> list[Snippet]:
    """Fenced blocks with the marker right before them; a marked table is kept as its rows."""
    lines = text.splitlines()
    out: list[Snippet] = []
    marker = None
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i])
        if m:
            marker = (m.group("kind"), m.group("reason"), i + 1)
            i += 1
            continue
        f = FENCE.match(lines[i])
        if f:
            start, body = i, []
            i += 1
            while i < len(lines) and not re.match(rf"^{re.escape(f.group('indent'))}```\s*$", lines[i]):
                body.append(lines[i])
                i += 1
            kind, reason = (marker[0], marker[1]) if marker else (None, None)
            out.append(Snippet(f.group("lang"), textwrap.dedent("\n".join(body)), start + 1, kind, reason))
            marker = None
        elif marker and marker[0] == "mapping table" and lines[i].lstrip().startswith("|"):
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(lines[i].strip())
                i += 1
            out.append(Snippet("table", "", marker[2], "mapping table", None, rows))
            marker = None
            continue
        elif lines[i].strip() and marker and not lines[i].lstrip().startswith("<!--"):
            marker = None  # a marker belongs to the block right after it only
        i += 1
    return out


SNIPPETS = parse(DOC.read_text(encoding="utf-8"))
PYTHON = [s for s in SNIPPETS if s.lang == "python"]


def test_every_python_snippet_is_marked_and_skips_say_why():
    assert len(PYTHON) >= 15
    for s in PYTHON:
        assert s.kind in ("run", "skip", "config"), f"line {s.line}: python snippet without a test marker"
        if s.kind == "skip":
            assert s.reason, f"line {s.line}: a skipped snippet must say why"


def test_basic_usage_is_the_guides_snippet_with_only_the_import_changed():
    first = next(s for s in PYTHON if s.kind == "run")
    ours = first.code.strip().splitlines()
    seed = SEED_BASIC_USAGE.strip().splitlines()
    assert ours[0] == "from rlhf_tui.bridge import TRLIntegrationConfig, TRLIntegrationManager"
    assert ours[1:] == seed[1:]


def test_config_listing_matches_the_class():
    from rlhf_tui.bridge import TRLIntegrationConfig

    listing = next(s for s in PYTHON if s.kind == "config").code
    documented = []
    for line in listing.splitlines():
        m = re.match(r"^\s+(\w+): [^=]+= (.+?)\s*(?:#.*)?$", line)
        if m:
            documented.append((m.group(1), ast.literal_eval(m.group(2))))
    actual = []
    for f in dataclasses.fields(TRLIntegrationConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        actual.append((f.name, default))
    assert documented == actual


def test_mapping_table_matches_the_code():
    from rlhf_tui.bridge.training.integration import MAPPING

    table = next(s for s in SNIPPETS if s.kind == "mapping table").table
    rows = []
    for row in table[2:]:
        cells = [c.strip().replace("`", "") for c in row.strip("|").split("|")]
        rows.append((cells[0], cells[1]))
    assert rows == [(name, trl_field) for name, trl_field, _ in MAPPING]


@pytest.mark.slow
@pytest.mark.parametrize("snippet", [s for s in PYTHON if s.kind == "skip"], ids=lambda s: f"line{s.line}")
def test_snippets_not_run_here(snippet):
    compile(snippet.code, f"trl-integration.md:{snippet.line}", "exec")  # at least valid Python
    pytest.skip(f"docs/trl-integration.md line {snippet.line}: {snippet.reason}")


@pytest.fixture
def guide_folder(tmp_path, monkeypatch, tiny_model):
    """The reader's working folder: offline, one torch thread (tiny model), an 'imdb' JSONL with a text column."""
    import torch

    from rlhf_tui.bridge.demo.tiny import CORPUS

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    imdb = tmp_path / "imdb.jsonl"
    imdb.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(CORPUS)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {'"gpt2"': repr(tiny_model), '"imdb"': repr(str(imdb))}
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_runnable_snippets_run_top_to_bottom(guide_folder, monkeypatch, tmp_path):
    namespace: dict = {"__name__": "__guide__"}
    basic_results = None
    for snippet in [s for s in PYTHON if s.kind == "run"]:
        code = snippet.code
        for old, new in guide_folder.items():
            code = code.replace(old, new)
        monkeypatch.setenv("RLHF_TUI_ADDRESS", free_address())  # each live monitor socket gets its own port
        try:
            # blank lines in front: tracebacks and warnings point at the real line of the guide
            exec(compile("\n" * snippet.line + code, "docs/trl-integration.md", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"snippet at docs/trl-integration.md line {snippet.line} failed: {exc!r}") from exc
        if basic_results is None and "results" in namespace:
            basic_results = namespace["results"]

    # The Basic Usage run really trained and checkpointed, with the default settings of the guide.
    assert basic_results["steps_completed"] == 100
    assert [c["step"] for c in basic_results["checkpoints"]] == [100]
    assert basic_results["checkpoints"][0]["health_score"] is not None
    assert (tmp_path / "checkpoints" / "checkpoint-60").is_dir()
    assert namespace["analysis"]["reliability_metrics"]["stability"] is not None


@pytest.mark.slow
def test_json_example_is_valid_and_shaped_like_a_real_event(tiny_model, tmp_path):
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

    blocks = [s for s in SNIPPETS if s.kind == "json"]
    assert blocks
    cb = RLHFMonitorCallback(address=False, log_dir=str(tmp_path))
    cb.log_step(1, {"kl": 0.1, "loss": 0.2})
    cb.close()
    real = next(json.loads(line) for line in open(cb.log_path) if '"step_end"' in line)
    for block in blocks:
        example = json.loads(block.code)
        assert set(example) <= set(real), f"line {block.line}: keys not in a real step_end event"
        for anomaly in example.get("anomalies", []):
            assert {"step", "metric", "detector", "severity", "message"} <= set(anomaly)
