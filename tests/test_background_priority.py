"""Background requests (the Batch API's lines, priority >= background_priority) use idle capacity
only: a real-time request's steps never carry them, and it never waits for their slots or blocks."""

from conftest import finished_outputs, recorded_steps
from minivllm import SamplingParams
from minivllm.config import EngineArgs
from minivllm.engine.llm_engine import LLMEngine

BACKGROUND = 10


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def request_sets(steps: list[list[tuple[str, int]]]) -> list[set[str]]:
    """The requests each recorded step ran (prefill chunks included)."""
    return [{rid for rid, _ in step} for step in steps]


def run_to_end(engine: LLMEngine) -> dict[str, list[int]]:
    return {rid: out.outputs[0].token_ids for rid, out in finished_outputs(engine).items()}


def add_batch_lines(engine: LLMEngine, count: int, max_tokens: int = 12) -> None:
    for i in range(count):
        engine.add_request(f"line{i}", f"Batch line {i}", greedy(max_tokens), priority=BACKGROUND)


def test_a_real_time_request_runs_alone_beside_a_running_batch_and_the_batch_resumes_unchanged():
    alone = LLMEngine(EngineArgs(model=None, num_kv_blocks=256, max_model_len=512))
    add_batch_lines(alone, 4)
    expected = run_to_end(alone)

    engine = LLMEngine(EngineArgs(model=None, num_kv_blocks=256, max_model_len=512))
    add_batch_lines(engine, 4)
    engine.step()
    engine.step()  # the batch lines are decoding
    engine.add_request("user", "Hello there", greedy(6))
    recorded = recorded_steps(engine)
    tokens = run_to_end(engine)
    steps = request_sets(recorded)
    user_steps = [step for step in steps if "user" in step]
    assert len(user_steps) == 6 and all(step == {"user"} for step in user_steps)  # never beside a batch line
    assert steps[:6] == user_steps  # and at once: the paused lines kept their blocks, nothing waited
    assert {rid: t for rid, t in tokens.items() if rid != "user"} == expected  # paused, then resumed exactly
    assert engine.scheduler.num_preemptions == 0


def test_a_real_time_request_takes_a_batch_lines_slot_at_once():
    engine = LLMEngine(EngineArgs(model=None, num_kv_blocks=256, max_model_len=512, max_num_seqs=2))
    add_batch_lines(engine, 3)
    engine.step()
    engine.add_request("user", "Hello there", greedy(4))
    recorded = recorded_steps(engine)
    tokens = run_to_end(engine)
    steps = request_sets(recorded)
    assert steps[0] == {"user"}
    assert engine.scheduler.num_preemptions == 1  # one line gave up its slot (and is recomputed later)
    assert sorted(tokens) == ["line0", "line1", "line2", "user"]


def test_a_real_time_request_takes_a_batch_lines_kv_blocks_at_once():
    # 12 blocks of 16: the three lines hold 9 of them when the user's 64-token prompt needs 5.
    engine = LLMEngine(EngineArgs(model=None, num_kv_blocks=12, max_model_len=192))
    for i in range(3):
        engine.add_request(f"line{i}", {"prompt_token_ids": list(range(1000 + i, 1040 + i))}, greedy(4),
                           priority=BACKGROUND)
    engine.step()
    engine.add_request("user", {"prompt_token_ids": list(range(2000, 2064))}, greedy(3))
    recorded = recorded_steps(engine)
    tokens = run_to_end(engine)
    steps = request_sets(recorded)
    assert steps[0] == {"user"}
    assert engine.scheduler.num_preemptions >= 1
    assert sorted(tokens) == ["line0", "line1", "line2", "user"]


def test_background_lines_run_together_when_nothing_else_does_and_plain_priority_when_off():
    engine = LLMEngine(EngineArgs(model=None, num_kv_blocks=256, max_model_len=512))
    add_batch_lines(engine, 3, max_tokens=4)
    recorded = recorded_steps(engine)
    run_to_end(engine)
    steps = request_sets(recorded)
    assert steps[0] == {"line0", "line1", "line2"}  # idle capacity is theirs: batched as usual

    engine = LLMEngine(EngineArgs(model=None, num_kv_blocks=256, max_model_len=512, background_priority=None))
    add_batch_lines(engine, 2)
    engine.step()
    engine.add_request("user", "Hello there", greedy(3))
    recorded = recorded_steps(engine)
    run_to_end(engine)
    steps = request_sets(recorded)
    assert steps[0] == {"line0", "line1", "user"}  # off: one batch, priority only orders admission


def test_background_only_steps_are_short_so_an_arriving_request_waits_little():
    from minivllm.engine.scheduler import BACKGROUND_STEP_TOKENS

    engine = LLMEngine(EngineArgs(model=None, num_kv_blocks=256, max_model_len=1024))
    for i in range(3):
        engine.add_request(f"line{i}", {"prompt_token_ids": list(range(1000, 1300))}, greedy(2), priority=BACKGROUND)
    assert sum(n for _, n in engine.scheduler.schedule()) == BACKGROUND_STEP_TOKENS
    engine.add_request("user", {"prompt_token_ids": list(range(3000, 3600))}, greedy(2))
    assert [(seq.request.request_id, n) for seq, n in engine.scheduler.schedule()] == [("user", 600)]


def test_background_priority_is_set_or_turned_off_from_the_flag_the_env_and_the_worker():
    from minivllm.cli import build_parser, engine_args_from
    from minivllm.worker.config import WorkerConfig

    parser = build_parser()

    def flags(*argv):
        return engine_args_from(parser, parser.parse_args(["serve", *argv]))

    assert flags("--background-priority", "none").background_priority is None
    assert flags("--background-priority", "5").background_priority == 5
    assert flags("--max-model-len", "none").max_model_len is None
    env = {"BACKGROUND_PRIORITY": "none"}
    assert WorkerConfig.load(environ=env, local_args_path="/absent").background_priority is None
    assert WorkerConfig.load(environ={}, local_args_path="/absent").background_priority == 10
