"""TRLIntegrationManager and the model's context: prompts + completions longer than the tiny GPT-2's 128
positions used to die in generation (`IndexError: index out of range in self`); now the completions are fitted
to what the longest prompt leaves (one warning) or a prompt that fills the context is refused in one line."""

from __future__ import annotations

import warnings

import pytest

from rlhf_tui.bridge import TRLIntegrationConfig, TRLIntegrationManager
from rlhf_tui.bridge.training.integration import IntegrationError, TRLMappingWarning
from rlhf_tui.bridge.training.integration.context import model_context

CONTEXT = 128  # the tiny model's n_positions (bridge/demo/tiny.py)


def words(n: int) -> str:
    """A prompt of n tokens for the tiny word-level tokenizer (every word is in its vocabulary)."""
    return " ".join(["the"] * n)


def zero(completions, **kwargs):
    return [0.0] * len(completions)


def _config(tmp_path, **kw):
    base = dict(
        log_with="none",
        logging_dir=str(tmp_path / "logs"),
        output_dir=str(tmp_path / "out"),
        monitor_address=False,
        device="cpu",
        batch_size=2,
        ppo_epochs=1,
        enable_checkpoint_analysis=False,
    )
    return TRLIntegrationConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def one_thread():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_context_is_read_from_a_folder_and_from_a_loaded_model(tiny_model):
    from transformers import AutoModelForCausalLM

    assert model_context(tiny_model) == (CONTEXT, "max_position_embeddings")  # GPT-2 maps it to n_positions
    assert model_context(AutoModelForCausalLM.from_pretrained(tiny_model))[0] == CONTEXT
    assert model_context(object()) is None


@pytest.mark.slow
def test_completions_are_fitted_to_what_the_longest_prompt_leaves(tiny_model, tmp_path):
    prompts = [words(100), words(120)] * 2  # 120 + 64 > 128: 8 tokens are left
    manager = TRLIntegrationManager(_config(tmp_path, model_name=tiny_model, max_completion_length=64))
    with pytest.warns(TRLMappingWarning) as caught:
        trainer = manager.setup_trl_trainer(dataset_name=prompts, reward_funcs=[zero])
    [warning] = [w for w in caught if "context" in str(w.message)]
    assert str(warning.message) == (
        "TRLIntegrationConfig: the longest prompt (120 tokens, row 1 of the train dataset) + "
        "max_completion_length=64 exceed the model's context (max_position_embeddings=128); completions are "
        "limited to 8 tokens for this run"
    )
    assert warning.filename == __file__  # points at the caller's line
    assert trainer.args.max_completion_length == 8 and manager.config.max_completion_length == 64
    results = manager.train_with_monitoring(2, save_checkpoints=False)  # old code: IndexError in generation
    assert results["steps_completed"] == 2
    assert max(h.get("completions/max_length", 0) for h in trainer.state.log_history) <= 8


def test_completions_that_fit_are_left_alone(tiny_model, tmp_path):
    manager = TRLIntegrationManager(_config(tmp_path, model_name=tiny_model, max_completion_length=16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TRLMappingWarning)
        trainer = manager.setup_trl_trainer(dataset_name=[words(112), words(5)], reward_funcs=[zero])
    assert trainer.args.max_completion_length == 16  # 112 + 16 = 128: exactly the context


@pytest.mark.parametrize("where", ["train", "eval"])
def test_a_prompt_that_fills_the_context_is_refused_in_one_line(tiny_model, tmp_path, where):
    long_prompts, short_prompts = [words(3), words(130)], [words(3), words(4)]
    manager = TRLIntegrationManager(_config(tmp_path, model_name=tiny_model, max_completion_length=8))
    train, evaluation = (long_prompts, short_prompts) if where == "train" else (short_prompts, long_prompts)
    with pytest.raises(IntegrationError) as err:
        manager.setup_trl_trainer(dataset_name=train, eval_dataset=evaluation, reward_funcs=[zero])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        f"prompt 1 of the {where} dataset is 130 tokens, which fills the model's context "
        "(max_position_embeddings=128) before any completion"
    )
    assert manager.trainer is None and manager.callback is None  # refused before anything was opened


def test_a_completion_longer_than_the_context_is_refused_when_prompts_cannot_be_measured(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    class Opaque:  # a processor that cannot be used to measure prompts (e.g. a multimodal one)
        def __init__(self, tok):
            self.tok = tok

        def __call__(self, *args, **kwargs):
            raise TypeError("needs images")

        def __getattr__(self, name):
            return getattr(self.tok, name)

    manager = TRLIntegrationManager(_config(tmp_path, model_name=tiny_model, max_completion_length=200))
    with pytest.raises(IntegrationError, match=r"max_completion_length=200 does not fit .*set max_completion_length"):
        manager.setup_trl_trainer(
            dataset_name=[words(3)],
            processing_class=Opaque(AutoTokenizer.from_pretrained(tiny_model)),
            reward_funcs=[zero],
        )
