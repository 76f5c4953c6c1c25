"""Plans: the shorthands, JSON files, validation messages and worker placements. No torch."""

from __future__ import annotations

import pytest

from hetserve.config import ParallelConfig
from hetserve.planner.plan import Plan, Stage, even_split, plan_from_config


def test_shorthands_make_even_or_given_splits():
    plan = Plan.from_sizes(30, pipeline_size=2, tensor_size=1)
    assert [(s.start, s.end) for s in plan.stages] == [(0, 15), (15, 30)]
    plan = Plan.from_sizes(30, pipeline_size=3, layer_split=[12, 10, 8], devices=["cuda:0", "cuda:1", "cpu"])
    assert [(s.start, s.end, s.devices) for s in plan.stages] == [
        (0, 12, ("cuda:0",)), (12, 22, ("cuda:1",)), (22, 30, ("cpu",))]
    plan = Plan.from_sizes(7, pipeline_size=2, tensor_size=2)
    assert [(s.start, s.end, s.tp_size) for s in plan.stages] == [(0, 4, 2), (4, 7, 2)]
    assert plan.world_size == 4
    assert even_split(10, 3) == [4, 3, 3]


def test_placements_split_heads_and_mlp_unevenly_when_asked():
    plan = Plan((Stage(0, 2, ("cuda:0", "cpu"), kv_heads=(2, 1)), Stage(2, 4, ("cpu",))))
    plan.validate(num_layers=4, num_kv_heads=3)
    workers = plan.placements(num_kv_heads=3, intermediate_size=1536)
    assert [(w.rank, w.stage, w.tp_rank, w.device) for w in workers] == [
        (0, 0, 0, "cuda:0"), (1, 0, 1, "cpu"), (2, 1, 0, "cpu")]
    assert [w.kv_heads for w in workers] == [(0, 2), (2, 3), (0, 3)]
    assert [w.mlp_columns for w in workers] == [(0, 1024), (1024, 1536), (0, 1536)]
    assert [w.layers for w in workers] == [(0, 2), (0, 2), (2, 4)]


def test_default_tensor_split_is_as_even_as_possible():
    workers = Plan.from_sizes(2, tensor_size=2).placements(num_kv_heads=3, intermediate_size=1536)
    assert [w.kv_heads for w in workers] == [(0, 2), (2, 3)]


def test_json_round_trip():
    plan = Plan((Stage(0, 20, ("cuda:0",), kv_cache_memory=2**30), Stage(20, 30, ("cpu", "cpu"), (2, 1), "10.0.0.2")))
    assert Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("stages, message", [
    ((Stage(0, 10, ("cpu",)), Stage(8, 30, ("cpu",))), "overlaps the previous stage"),
    ((Stage(0, 10, ("cpu",)), Stage(12, 30, ("cpu",))), r"leaves layers \[10, 12\) uncovered"),
    ((Stage(0, 10, ("cpu",)),), r"leave layers \[10, 30\) uncovered"),
    ((Stage(0, 31, ("cpu",)),), "go past the model's 30 layers"),
    ((Stage(0, 30, ("tpu:0",)),), "'tpu:0' is not a device"),
    ((Stage(0, 30, ("cpu",) * 4),), "tensor parallel size 4 exceeds the model's 3 KV heads"),
    ((Stage(0, 30, ("cpu", "cpu"), kv_heads=(3, 0)),), "must give each of its 2 ranks at least one"),
    ((), "plan has no stages"),
])
def test_impossible_plans_say_what_is_wrong(stages, message):
    with pytest.raises(ValueError, match=message):
        Plan(stages).validate(num_layers=30, num_kv_heads=3)


def test_plan_from_config_reads_a_file_or_the_shorthands(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(Plan.from_sizes(30, 2).to_json())
    assert plan_from_config(ParallelConfig(plan=str(path)), 30, 3, "cpu") == Plan.from_sizes(30, 2)
    plan = plan_from_config(ParallelConfig(pipeline_parallel_size=2, pipeline_layer_split="20,10"), 30, 3, "cpu")
    assert [(s.start, s.end, s.devices) for s in plan.stages] == [(0, 20, ("cpu",)), (20, 30, ("cpu",))]
    with pytest.raises(ValueError, match="2 entries for 3 pipeline stages"):
        plan_from_config(ParallelConfig(pipeline_parallel_size=3, pipeline_layer_split="20,10"), 30, 3, "cpu")
    with pytest.raises(ValueError, match="3 devices given for 2 workers"):
        plan_from_config(ParallelConfig(tensor_parallel_size=2, devices="cpu,cpu,cpu"), 30, 3, "cpu")
    path.write_text('{"stages": [{"start": 0}]}')
    with pytest.raises(ValueError, match="not a plan"):
        plan_from_config(ParallelConfig(plan=str(path)), 30, 3, "cpu")
    with pytest.raises(ValueError, match="not both"):
        ParallelConfig(plan=str(path), tensor_parallel_size=2)
