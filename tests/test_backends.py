"""Single-process checks of what the trainer does per accelerate backend (trl_flow_egrpo.backends) and of
the failure propagation (trl_flow_egrpo.failures). The two-process runs are in test_distributed.py."""

import glob
import os
import threading
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

from trl_flow_egrpo import backends, failures, registry

ACCELERATE_CONFIGS = sorted(
    glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "accelerate", "*.yaml"))
)


def launch_environment(config_file: str) -> dict[str, str]:
    """The environment ``accelerate launch --config_file <config_file>`` gives each process (without starting it)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, precision_from_config = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", config_file, "train.py"])
    )
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(
            list(defaults.deepspeed_config) + (["mixed_precision"] if precision_from_config else [])
        )
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def deepspeed_accelerator(plugin: DeepSpeedPlugin, num_processes: int = 8):
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=num_processes)


@pytest.mark.parametrize("config_file", [f for f in ACCELERATE_CONFIGS if "deepspeed" in f], ids=os.path.basename)
def test_shipped_deepspeed_configs_get_what_deepspeed_needs(config_file, monkeypatch):
    """accelerate's prepare refuses a model without a dataloader while train_micro_batch_size_per_gpu is 'auto'."""
    for name, value in launch_environment(config_file).items():
        monkeypatch.setenv(name, value)
    plugin = DeepSpeedPlugin()
    assert plugin.is_auto("train_micro_batch_size_per_gpu")  # what accelerate would refuse
    backends.configure_deepspeed(
        deepspeed_accelerator(plugin), micro_batch_size=3, micro_batches_per_step=2, max_grad_norm=0.5
    )
    config = plugin.deepspeed_config
    assert not plugin.is_auto("train_micro_batch_size_per_gpu")
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (3, 3 * 8)
    assert (config["gradient_accumulation_steps"], config["gradient_clipping"]) == (1, 0.5)
    stage = config["zero_optimization"]["stage"]
    assert stage == int(os.path.basename(config_file)[len("deepspeed_zero")])
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] == (stage == 3)


def test_deepspeed_values_that_contradict_the_trainer_are_refused():
    def plugin(**config):
        return DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 2}, **config})

    with pytest.raises(ValueError, match="gradient_accumulation_steps=4.*set it to 1 or 'auto'"):
        backends.configure_deepspeed(deepspeed_accelerator(plugin(gradient_accumulation_steps=4)), 1, 1, 1.0)
    with pytest.raises(ValueError, match="gradient_clipping=0.3.*max_grad_norm"):
        backends.configure_deepspeed(deepspeed_accelerator(plugin(gradient_clipping=0.3)), 1, 1, 1.0)
    unclipped = plugin(gradient_clipping="auto")
    backends.configure_deepspeed(deepspeed_accelerator(unclipped), 1, 1, None)
    assert unclipped.deepspeed_config["gradient_clipping"] == 0.0  # DeepSpeed's "off"


def test_several_micro_batches_under_deepspeed_need_an_accelerate_that_marks_the_boundary(monkeypatch):
    monkeypatch.setattr(backends, "_deepspeed_backward_honours_boundary", lambda: False)
    backends.configure_deepspeed(deepspeed_accelerator(DeepSpeedPlugin(zero_stage=2)), 8, 1, 1.0)
    with pytest.raises(ValueError, match="accelerate >= 1.8"):
        backends.configure_deepspeed(deepspeed_accelerator(DeepSpeedPlugin(zero_stage=2)), 4, 2, 1.0)


@pytest.mark.parametrize("config_file", [f for f in ACCELERATE_CONFIGS if "fsdp" in f], ids=os.path.basename)
def test_shipped_fsdp_configs_load_the_weights_once(config_file, monkeypatch):
    environment = launch_environment(config_file)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert FullyShardedDataParallelPlugin().cpu_ram_efficient_loading
    assert not backends.placeholder_weights_requested({**environment, "RANK": "0"})
    assert backends.placeholder_weights_requested({**environment, "RANK": "3"})
    if "hybrid" in config_file:  # shard within a machine, replicate across machines
        from accelerate.parallelism_config import ParallelismConfig

        mesh = ParallelismConfig()
        assert (mesh.dp_replicate_size, mesh.dp_shard_size) == (2, 8)


def test_placeholder_transformer_has_the_real_shapes_and_buffers(monkeypatch):
    real = registry.load_pipeline("tiny-sd3", torch.bfloat16).transformer
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    monkeypatch.setenv("RANK", "1")
    # Only a caller that hands the pipeline to the trainer (whose prepare fills it) asks for the placeholder.
    assert all(
        torch.equal(p, real.state_dict()[name])
        for name, p in registry.load_pipeline("tiny-sd3", torch.bfloat16).transformer.state_dict().items()
    )
    placeholder = registry.load_pipeline("tiny-sd3", torch.bfloat16, main_process_weights_only=True).transformer
    assert type(placeholder) is type(real)
    shapes = {name: (p.shape, p.dtype, p.device.type) for name, p in placeholder.named_parameters()}
    assert shapes == {name: (p.shape, p.dtype, p.device.type) for name, p in real.named_parameters()}
    # FSDP broadcasts parameters and persistent buffers only: SD3's non-persistent positional table must be real.
    buffers = dict(real.named_buffers())
    assert buffers and all(torch.equal(buffer, buffers[name]) for name, buffer in placeholder.named_buffers())


class FakeAccelerator:
    """Records the accumulation calls an accelerator receives."""

    def __init__(self, distributed_type):
        self.distributed_type, self.sync_gradients, self.no_sync_calls = distributed_type, True, 0

    def no_sync(self, model):
        self.no_sync_calls += 1
        return torch.enable_grad()  # any context manager


@pytest.mark.parametrize(
    "distributed_type, no_sync_calls",
    [(DistributedType.MULTI_GPU, 1), (DistributedType.FSDP, 0), (DistributedType.DEEPSPEED, 0)],
)
def test_accumulation_context_per_backend(distributed_type, no_sync_calls):
    accelerator = FakeAccelerator(distributed_type)
    for boundary in (False, True):
        with backends.accumulation_context(accelerator, None, boundary):
            # DeepSpeed's backward steps the engine only where sync_gradients is True.
            assert accelerator.sync_gradients == (boundary or distributed_type != DistributedType.DEEPSPEED)
        assert accelerator.sync_gradients
    assert accelerator.no_sync_calls == no_sync_calls
    with pytest.raises(KeyError), backends.accumulation_context(accelerator, None, boundary=False):
        raise KeyError
    assert accelerator.sync_gradients


def test_grad_norm_value():
    assert torch.isnan(backends.grad_norm_value(None)).all()
    assert backends.grad_norm_value(2.5).tolist() == [2.5]
    assert backends.grad_norm_value(torch.tensor(3.0, dtype=torch.float64)).dtype == torch.float32


# ------------------------------------------------------------------------------------------- failures


def watch(store, rank=0):
    exits = []
    watcher = failures.FailureWatcher(store, rank, poll_seconds=0.02, exit_process=exits.append).start()
    return watcher, exits


def test_a_published_failure_stops_the_other_process_with_its_message(capfd):
    store = torch.distributed.HashStore()
    watcher, exits = watch(store)
    failures.publish_failure(store, 1, RuntimeError("reward server down"), others=1, wait_seconds=10)
    watcher.stop()
    assert exits == [failures.EXIT_CODE]
    assert "stopping rank 0 because rank 1 failed with RuntimeError: reward server down" in capfd.readouterr().err
    assert store.add(failures.ACKNOWLEDGED_KEY, 0) == 1  # the failing process waited for this acknowledgement


def test_the_first_failure_is_the_one_reported():
    store = torch.distributed.HashStore()
    failures.publish_failure(store, 2, ValueError("first"), others=0, wait_seconds=0)
    failures.publish_failure(store, 0, ValueError("second"), others=0, wait_seconds=0)
    assert store.get(failures.FAILURE_KEY).decode() == "rank 2 failed with ValueError: first"


def test_no_failure_no_exit():
    watcher, exits = watch(torch.distributed.HashStore())
    threading.Event().wait(0.1)
    watcher.stop()
    assert exits == []


def test_an_unreachable_store_counts_as_a_failure_of_its_host(capfd):
    class DeadStore:
        def check(self, keys):
            raise ConnectionResetError("Connection reset by peer")

    watcher, exits = watch(DeadStore(), rank=1)
    watcher._thread.join(5)
    assert exits == [failures.EXIT_CODE]
    assert "stopping rank 1 because the store hosted by rank 0 became unreachable" in capfd.readouterr().err


def test_one_process_runs_the_body_unchanged():
    with pytest.raises(RuntimeError, match="as is"), failures.propagate_failures(SimpleNamespace(num_processes=1)):
        raise RuntimeError("as is")
