"""The deterministic monitor data the TUI tests share (conftest's `make_store` fixture) has what the panes need."""


def test_the_data_has_what_the_panes_need(make_store):
    store = make_store()
    run = store.current_run
    assert run.rows == 200 and run.last_step == 200
    assert len(run.checkpoints) == 2 and run.rewards and run.system[0]["gpus"]
    assert make_store(gpu=False).current_run.system[0]["gpus"] == []
