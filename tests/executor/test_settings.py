"""The executor's settings come from the environment, each bad value one line naming the variable; submitit's
own parameters go to its AutoExecutor unchanged and its refusals come back as one line."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.core.errors import UserError
from pipeline.executor.settings import DEFAULT_RETRIES, ExecutorSettings, settings_from_env
from pipeline.executor.submitit_run import make_executor


def test_nothing_set_is_the_in_process_run_of_one_shard():
    settings = settings_from_env({"HOME": "/x"})
    assert settings == ExecutorSettings()
    assert (settings.executor, settings.shards, settings.retries) == ("local", 1, DEFAULT_RETRIES)


def test_every_variable_is_read():
    settings = settings_from_env({
        "PIPELINE_EXECUTOR": "submitit", "PIPELINE_SUBMITIT_CLUSTER": "local", "PIPELINE_SHARDS": "4",
        "PIPELINE_SHARD_RETRIES": "0", "PIPELINE_EXECUTOR_DIR": "/shared/run",
        "PIPELINE_SUBMITIT_PARAMS": '{"slurm_partition": "gpu", "timeout_min": 30}'})
    assert settings.executor == "submitit" and settings.cluster == "local"
    assert (settings.shards, settings.retries, str(settings.folder)) == (4, 0, "/shared/run")
    assert settings.submitit_params == {"slurm_partition": "gpu", "timeout_min": 30}


def test_submitit_params_may_be_a_json_file(tmp_path):
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"gpus_per_node": 1, "slurm_additional_parameters": {"account": "lab"}}))
    settings = settings_from_env({"PIPELINE_EXECUTOR": "submitit", "PIPELINE_SUBMITIT_PARAMS": str(path)})
    assert settings.submitit_params["slurm_additional_parameters"] == {"account": "lab"}


@pytest.mark.parametrize(("env", "names"), [
    ({"PIPELINE_EXECUTOR": "slurm"}, ["PIPELINE_EXECUTOR is 'slurm'", "local, submitit"]),
    ({"PIPELINE_EXECUTOR": "submitit", "PIPELINE_SUBMITIT_CLUSTER": "pbs"}, ["PIPELINE_SUBMITIT_CLUSTER", "slurm, local, debug"]),
    ({"PIPELINE_SHARDS": "0"}, ["PIPELINE_SHARDS is '0'", ">= 1"]),
    ({"PIPELINE_SHARDS": "three"}, ["PIPELINE_SHARDS is 'three'"]),
    ({"PIPELINE_SHARD_RETRIES": "-1"}, ["PIPELINE_SHARD_RETRIES is '-1'", ">= 0"]),
    ({"PIPELINE_SHARD": "3"}, ["unknown environment variable PIPELINE_SHARD", "did you mean PIPELINE_SHARDS?"]),
    ({"PIPELINE_SUBMITIT_CLUSTER": "local"}, ["PIPELINE_SUBMITIT_CLUSTER is set but PIPELINE_EXECUTOR is local"]),
    ({"PIPELINE_EXECUTOR": "submitit", "PIPELINE_SUBMITIT_PARAMS": "{'partition': 1}"}, ["not valid JSON"]),
    ({"PIPELINE_EXECUTOR": "submitit", "PIPELINE_SUBMITIT_PARAMS": "[1]"}, ["neither a JSON object nor"]),
    ({"PIPELINE_EXECUTOR": "submitit", "PIPELINE_SUBMITIT_PARAMS": "{}  x"}, ["not valid JSON"]),
])
def test_a_bad_setting_is_one_line_naming_the_variable_and_what_is_allowed(env, names):
    with pytest.raises(UserError) as info:
        settings_from_env(env)
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_submitits_own_refusal_of_a_parameter_is_one_line(tmp_path):
    settings = ExecutorSettings(executor="submitit", cluster="local", folder=tmp_path,
                                submitit_params={"slurm_partitoin": "gpu"})  # misspelt
    with pytest.raises(UserError, match=r"PIPELINE_SUBMITIT_PARAMS is refused by submitit's AutoExecutor: .*'slurm_partitoin'") as info:
        make_executor(settings, "intervene")
    assert "\n" not in str(info.value)


def test_the_parameters_reach_submitits_executor(tmp_path):
    settings = ExecutorSettings(executor="submitit", cluster="local", folder=tmp_path,
                                submitit_params={"timeout_min": 7, "slurm_partition": "gpu"})
    executor = make_executor(settings, "intervene")
    assert executor.cluster == "local" and executor.parameters["timeout_min"] == 7  # slurm_* is SLURM's alone


@pytest.mark.skipif(shutil.which("srun") is not None, reason="SLURM is installed here")
def test_slurm_where_there_is_none_is_one_line(tmp_path):
    with pytest.raises(UserError, match="PIPELINE_SUBMITIT_CLUSTER is slurm but submitit cannot use it here"):
        make_executor(ExecutorSettings(executor="submitit", folder=tmp_path), "generate")
