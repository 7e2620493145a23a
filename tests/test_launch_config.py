"""Per-device launch configuration: the cache file, its keys, the environment override, the lookup
order, the interpreter path (unchanged), the tuner's choice; on a GPU, a real sweep."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from badam_ext import kernels as K
from badam_ext.kernels import launch_config as lc
from badam_ext.kernels import tune, tuning_cache

FAKE = tuning_cache.DeviceKey("NVIDIA L40S", "sm89", "3.6.0")  # a GPU with no built-in entry
CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory in $BADAM_EXT_CACHE, no launch override, lookups read afresh."""
    monkeypatch.setenv(tuning_cache.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(lc.LAUNCH_ENV, raising=False)
    lc.reload_cache()
    yield tmp_path / tuning_cache.FILE_NAME
    lc.reload_cache()


@pytest.fixture
def fake_gpu(monkeypatch, cache):
    """Lookups behave as on a CUDA device named by FAKE (no GPU needed)."""
    monkeypatch.setattr(lc, "interpreted", lambda: False)
    monkeypatch.setattr(lc, "device_key", lambda device: FAKE)
    return cache


def _write(path, entries, version=tuning_cache.FORMAT_VERSION):
    path.write_text(json.dumps({"version": version, "entries": entries}))


# ------------------------------------------------------------------------------------- the file
def test_cache_dir_precedence(tmp_path):
    assert tuning_cache.cache_dir({"BADAM_EXT_CACHE": str(tmp_path), "XDG_CACHE_HOME": "/x"}) == tmp_path
    assert str(tuning_cache.cache_dir({"XDG_CACHE_HOME": "/x"})) == "/x/badam_ext"
    assert str(tuning_cache.cache_dir({})).endswith(".cache/badam_ext")
    assert tuning_cache.cache_path({"BADAM_EXT_CACHE": str(tmp_path)}).name == "launch_configs.json"


def test_entry_key_names_device_compiler_kernel_and_dtype_class():
    assert FAKE.entry_key("fused_adamw", "16bit") == "NVIDIA L40S|sm89|triton 3.6.0|fused_adamw|16bit"
    assert lc.dtype_class(torch.bfloat16) == lc.dtype_class(torch.float16) == lc.dtype_class(None) == "16bit"
    assert lc.dtype_class(torch.float32) == "32bit"


def test_write_merges_and_reads_back(cache):
    k1, k2 = FAKE.entry_key("fused_adamw", "16bit"), FAKE.entry_key("block_load", "16bit")
    tuning_cache.write(cache, {k1: {"block_size": 1024, "num_warps": 4, "ms": 1.5}})
    tuning_cache.write(cache, {k2: {"block_size": 1024, "num_warps": 8}})
    entries = tuning_cache.read(cache)
    assert entries == {k1: tuning_cache.CachedConfig(1024, 4), k2: tuning_cache.CachedConfig(1024, 8)}
    assert json.loads(cache.read_text())["entries"][k1]["ms"] == 1.5
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temporary file left behind


@pytest.mark.parametrize("text, why", [
    ("{not json", "not valid JSON"),
    ('["a list"]', '"entries" object'),
    ('{"version": 99, "entries": {}}', "format version 99"),
    ('{"version": 1, "entries": {"k": {"block_size": 1000, "num_warps": 4}}}', "not a power of two"),
    ('{"version": 1, "entries": {"k": {"block_size": 1024, "num_warps": 3}}}', "num_warps 3"),
    ('{"version": 1, "entries": {"k": {"block_size": "1024", "num_warps": 4}}}', "must be an int"),
    ('{"version": 1, "entries": {"k": {"block_size": true, "num_warps": 4}}}', "must be an int"),
])
def test_invalid_file_is_ignored_with_a_warning(cache, text, why):
    cache.write_text(text)
    with pytest.raises(tuning_cache.CacheFormatError, match=why):
        tuning_cache.parse(text)
    with pytest.warns(RuntimeWarning, match=f"ignoring the launch-configuration cache .*{why}"):
        assert tuning_cache.read(cache) == {}


def test_write_replaces_an_invalid_file_and_refuses_an_invalid_entry(cache):
    cache.write_text("garbage")
    key = FAKE.entry_key("fused_adamw", "16bit")
    with pytest.warns(RuntimeWarning, match="replacing the invalid"):
        tuning_cache.write(cache, {key: {"block_size": 512, "num_warps": 2}})
    assert tuning_cache.read(cache) == {key: tuning_cache.CachedConfig(512, 2)}
    with pytest.raises(tuning_cache.CacheFormatError, match="num_warps 5"):
        tuning_cache.write(cache, {key: {"block_size": 512, "num_warps": 5}})
    assert tuning_cache.read(cache) == {key: tuning_cache.CachedConfig(512, 2)}


def test_missing_file_reads_empty_without_warning(cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning_cache.read(cache) == {}


# ----------------------------------------------------------------------------------- the lookup
def test_lookup_order_on_a_gpu(fake_gpu, monkeypatch):
    # nothing cached: the built-in default (the H100's 2048 x 8)
    assert lc.launch_config(CUDA0) == lc.LaunchConfig(2048, 8)
    assert lc.launch_config(CUDA0).source == "builtin"
    _write(fake_gpu, {FAKE.entry_key("fused_adamw", "16bit"): {"block_size": 1024, "num_warps": 4},
                      FAKE.entry_key("block_load", "16bit"): {"block_size": 1024, "num_warps": 8},
                      FAKE.entry_key("fused_adamw", "32bit"): {"block_size": 512, "num_warps": 2}})
    lc.reload_cache()
    cfg = lc.launch_config(CUDA0)
    assert (cfg.block_size, cfg.num_warps, cfg.source) == (1024, 4, "cache")
    assert lc.default_block_size(CUDA0) == 1024
    assert lc.default_block_size(CUDA0, dtype=torch.bfloat16) == 1024
    assert lc.default_block_size(CUDA0, dtype=torch.float32) == 512
    assert lc.default_num_warps(1024, CUDA0) == 4
    assert lc.default_num_warps(1024, CUDA0, kernel=lc.BLOCK_LOAD) == 8
    assert lc.default_num_warps(4096, CUDA0) == lc.heuristic_num_warps(4096)  # another block: the heuristic
    # the environment beats the cache; "builtin" skips it
    monkeypatch.setenv(lc.LAUNCH_ENV, "512x2")
    assert lc.launch_config(CUDA0, lc.BLOCK_LOAD) == lc.LaunchConfig(512, 2)
    monkeypatch.setenv(lc.LAUNCH_ENV, "builtin")
    assert lc.launch_config(CUDA0) == lc.LaunchConfig(2048, 8)
    # an override (the tuner's sweep) beats both
    with lc.override(4096, 16):
        assert lc.default_block_size(CUDA0) == 4096 and lc.default_num_warps(4096, CUDA0, lc.BLOCK_LOAD) == 16
    assert lc.default_block_size(CUDA0) == 2048


def test_8bit_step_takes_its_own_cache_entry_else_the_fp32_steps(fake_gpu):
    _write(fake_gpu, {FAKE.entry_key("fused_adamw", "16bit"): {"block_size": 1024, "num_warps": 2}})
    lc.reload_cache()
    assert lc.launch_config(CUDA0, lc.FUSED_STEP_8BIT) == lc.LaunchConfig(1024, 2, "cache")
    _write(fake_gpu, {FAKE.entry_key("fused_adamw", "16bit"): {"block_size": 1024, "num_warps": 2},
                      FAKE.entry_key("fused_adamw_8bit", "16bit"): {"block_size": 256, "num_warps": 1}})
    lc.reload_cache()
    assert lc.launch_config(CUDA0, lc.FUSED_STEP_8BIT) == lc.LaunchConfig(256, 1, "cache")
    assert lc.launch_config(CUDA0) == lc.LaunchConfig(1024, 2, "cache")
    assert lc.STEP_KERNELS == {"fp32": lc.FUSED_STEP, "8bit": lc.FUSED_STEP_8BIT}


def test_gpu_warps_for_an_uncached_kernel_fall_back_to_the_heuristic_at_that_block(fake_gpu):
    _write(fake_gpu, {FAKE.entry_key("fused_adamw", "16bit"): {"block_size": 1024, "num_warps": 2}})
    lc.reload_cache()
    # grad_sq_norm has no entry: its config is the built-in 2048 x 8, so at 1024 the heuristic's 4
    assert lc.default_num_warps(1024, CUDA0, kernel=lc.GRAD_SQ_NORM) == 4
    assert lc.default_num_warps(1024, CUDA0) == 2


def test_builtin_table_by_device_name(fake_gpu, monkeypatch):
    monkeypatch.setattr(lc, "device_key", lambda d: tuning_cache.DeviceKey("NVIDIA H100 80GB HBM3", "sm90", "3.6.0"))
    assert lc.launch_config(CUDA0) == lc.MEASURED["H100"][lc.FUSED_STEP]
    # no 8-bit entry of its own on the H100: the fp32 step's
    assert lc.launch_config(CUDA0, lc.FUSED_STEP_8BIT) == lc.MEASURED["H100"][lc.FUSED_STEP]
    monkeypatch.setattr(lc, "device_key", lambda d: tuning_cache.DeviceKey("NVIDIA H200", "sm90", "3.6.0"))
    assert (lc.launch_config(CUDA0).block_size, lc.launch_config(CUDA0).num_warps) == (512, 4)
    assert (lc.launch_config(CUDA0, lc.FUSED_STEP_8BIT).block_size,
            lc.launch_config(CUDA0, lc.FUSED_STEP_8BIT).num_warps) == (256, 1)
    assert lc.default_num_warps(256, CUDA0, lc.FUSED_STEP_8BIT) == 1
    # the block load's entry is for the 8-bit step's 256-element tables; the fp32 step's 512 take the heuristic
    assert lc.launch_config(CUDA0, lc.BLOCK_LOAD) == lc.MEASURED["H200"][lc.BLOCK_LOAD]
    assert lc.default_num_warps(256, CUDA0, lc.BLOCK_LOAD) == 1
    assert lc.default_num_warps(512, CUDA0, lc.BLOCK_LOAD) == lc.heuristic_num_warps(512) == 4
    assert lc.default_num_warps(512, CUDA0, lc.GRAD_SQ_NORM) == 4  # no entry of its own: the fp32 step's
    monkeypatch.setattr(lc, "device_key", lambda d: tuning_cache.DeviceKey("Some GPU", "sm80", "3.6.0"))
    assert lc.launch_config(CUDA0) == lc.LaunchConfig(lc.GPU_BLOCK_SIZE, lc.heuristic_num_warps(lc.GPU_BLOCK_SIZE))


def test_invalid_cache_file_falls_back_with_one_warning(fake_gpu):
    fake_gpu.write_text("{broken")
    with pytest.warns(RuntimeWarning, match="ignoring the launch-configuration cache"):
        assert lc.launch_config(CUDA0) == lc.LaunchConfig(2048, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read once per process: no second warning
        assert lc.default_block_size(CUDA0) == 2048


@pytest.mark.parametrize("value", ["1024", "1000x4", "1024x3", "axb", "1024x4x2"])
def test_invalid_env_override_is_a_clear_error(fake_gpu, monkeypatch, value):
    monkeypatch.setenv(lc.LAUNCH_ENV, value)
    with pytest.raises(ValueError, match="BADAM_EXT_LAUNCH=.*expected BLOCKxWARPS"):
        lc.launch_config(CUDA0)


def test_unknown_kernel_and_bad_override_are_refused(fake_gpu):
    with pytest.raises(ValueError, match="unknown kernel"):
        lc.launch_config(CUDA0, kernel="adam")
    with pytest.raises(ValueError, match="power of two"):
        with lc.override(1000, 4):
            pass
    with pytest.raises(ValueError, match="num_warps"):
        with lc.override(1024, 3):
            pass
    with pytest.raises(ValueError, match="max_registers must be in \\[24, 255\\], got 300"):
        with lc.override(1024, 4, 300):
            pass


def test_register_cap_applies_to_its_own_program_shape_only(fake_gpu, monkeypatch):
    monkeypatch.setattr(lc, "device_key", lambda d: tuning_cache.DeviceKey("NVIDIA H200", "sm90", "3.6.0"))
    assert lc.launch_config(CUDA0, lc.FUSED_STEP_8BIT).max_registers == 64
    assert lc.default_max_registers(256, 1, CUDA0, lc.FUSED_STEP_8BIT) == 64
    # tables of another shape (a user's block size) compile without the cap measured for 256 x 1
    assert lc.default_max_registers(512, 1, CUDA0, lc.FUSED_STEP_8BIT) is None
    assert lc.default_max_registers(256, 2, CUDA0, lc.FUSED_STEP_8BIT) is None
    assert lc.default_max_registers(512, 4, CUDA0, lc.FUSED_STEP) is None  # the fp32 step has no cap
    with lc.override(256, 1, 48):
        assert lc.default_max_registers(256, 1, CUDA0, lc.FUSED_STEP_8BIT) == 48
    assert lc.default_max_registers(256, 1, torch.device("cpu"), lc.FUSED_STEP_8BIT) is None
    # "builtin" ignores the cache, not the kernel's own measured entry; BLOCKxWARPS sets no cap
    monkeypatch.setenv(lc.LAUNCH_ENV, "builtin")
    assert lc.launch_config(CUDA0, lc.FUSED_STEP_8BIT) == lc.MEASURED["H200"][lc.FUSED_STEP_8BIT]
    assert lc.launch_config(CUDA0) == lc.MEASURED["H200"][lc.FUSED_STEP]
    monkeypatch.setenv(lc.LAUNCH_ENV, "256x1")
    assert lc.launch_config(CUDA0, lc.FUSED_STEP_8BIT) == lc.LaunchConfig(256, 1)


def test_prefetch_distance_applies_to_its_own_program_shape_only(fake_gpu, monkeypatch):
    monkeypatch.setattr(lc, "device_key", lambda d: tuning_cache.DeviceKey("NVIDIA H200", "sm90", "3.6.0"))
    measured = lc.MEASURED["H200"][lc.FUSED_STEP_8BIT].prefetch
    assert measured > 0 and lc.launch_config(CUDA0, lc.FUSED_STEP_8BIT).prefetch == measured
    assert lc.default_prefetch(256, 1, CUDA0, lc.FUSED_STEP_8BIT) == measured
    assert lc.default_prefetch(512, 1, CUDA0, lc.FUSED_STEP_8BIT) == 0
    assert lc.default_prefetch(256, 2, CUDA0, lc.FUSED_STEP_8BIT) == 0
    assert lc.default_prefetch(512, 4, CUDA0, lc.FUSED_STEP) == 0  # the fp32 step measured none
    assert lc.default_prefetch(256, 1, torch.device("cpu"), lc.FUSED_STEP_8BIT) == 0
    with lc.override(256, 1, 64, 5):
        assert lc.default_prefetch(256, 1, CUDA0, lc.FUSED_STEP_8BIT) == 5
    for bad in (-1, True, 1.5, tuning_cache.MAX_PREFETCH + 1):
        with pytest.raises(ValueError, match="prefetch must be an int in"):
            with lc.override(256, 1, None, bad):
                pass
    monkeypatch.setenv(lc.LAUNCH_ENV, "256x1")  # BLOCKxWARPS: no cap, no prefetch
    assert lc.launch_config(CUDA0, lc.FUSED_STEP_8BIT).prefetch == 0


@pytest.mark.parametrize("prefetch, why", [(-1, "prefetch -1"), (True, "prefetch True"), ("8", "prefetch '8'")])
def test_cache_entry_prefetch_is_checked(cache, prefetch, why):
    with pytest.raises(tuning_cache.CacheFormatError, match=why):
        tuning_cache.write(cache, {"k": {"block_size": 256, "num_warps": 1, "prefetch": prefetch}})


def test_cache_entry_prefetch_round_trips_and_is_not_borrowed(fake_gpu, monkeypatch):
    monkeypatch.setattr(lc, "device_key", lambda d: tuning_cache.DeviceKey("NVIDIA H100", "sm90", "3.6.0"))
    key = lc.device_key(CUDA0)
    trial = tune.Trial(lc.FUSED_STEP_8BIT, 256, 1, 1.17, 3000.0, 0.7, max_registers=64, prefetch=2112)
    entries = tune.cache_entries(tune.choose([_trial("fused_adamw", 256, 1, 1.5), trial]), key, torch.bfloat16,
                                 "llama3-8b", 4296.0)
    assert entries[key.entry_key(lc.FUSED_STEP_8BIT, "16bit")]["prefetch"] == 2112
    assert "prefetch" not in entries[key.entry_key(lc.FUSED_STEP, "16bit")]
    assert tune.describe(trial) == "fused_adamw_8bit (<= 64 registers, prefetch 2112)"
    tuning_cache.write(fake_gpu, entries)
    lc.reload_cache()
    assert lc.launch_config(CUDA0, lc.FUSED_STEP_8BIT) == lc.LaunchConfig(256, 1, max_registers=64, prefetch=2112)
    assert lc.default_prefetch(256, 1, CUDA0, lc.FUSED_STEP_8BIT) == 2112
    # an fp32 entry with a distance lends the 8-bit step its shape, not its distance
    tuning_cache.write(fake_gpu, {key.entry_key("fused_adamw", "32bit"): {"block_size": 256, "num_warps": 1,
                                                                         "prefetch": 9}})
    lc.reload_cache()
    assert lc.launch_config(CUDA0, lc.FUSED_STEP, torch.float32).prefetch == 9
    assert lc.launch_config(CUDA0, lc.FUSED_STEP_8BIT, torch.float32).prefetch == 0


def test_no_prefetch_before_sm90(fake_gpu, monkeypatch):
    """The bulk-copy prefetch is Hopper's: before sm_90 a cached distance is not used, the tuner tries
    none, and tables refuse one with a message."""
    from badam_ext.kernels import tables as T

    tuning_cache.write(fake_gpu, {FAKE.entry_key(lc.FUSED_STEP_8BIT, "16bit"): {"block_size": 256, "num_warps": 1,
                                                                               "prefetch": 500}})
    lc.reload_cache()
    assert lc.launch_config(CUDA0, lc.FUSED_STEP_8BIT).prefetch == 500  # what the cache says
    assert not lc.supports_l2_prefetch(CUDA0)  # FAKE is an sm_89 GPU
    assert lc.default_prefetch(256, 1, CUDA0, lc.FUSED_STEP_8BIT) == 0
    assert tune.prefetch_candidates(CUDA0) == [0]
    tables = K.BlockTables((torch.zeros(300),), (0,), (True,), 256, 1, torch.zeros(1, 4, dtype=torch.int64),
                           torch.zeros(2, 2, dtype=torch.int32))
    tables.device = CUDA0  # as tables of that GPU would be
    with pytest.raises(ValueError, match="needs a GPU of compute capability 9.0"):
        tables.step_prefetch = 4
    tables.step_prefetch = 0
    monkeypatch.setattr(lc, "device_key", lambda d: tuning_cache.DeviceKey("NVIDIA H100", "sm90", "3.6.0"))
    assert lc.supports_l2_prefetch(CUDA0)
    monkeypatch.setattr(lc, "device_key", lambda d: tuning_cache.DeviceKey("NVIDIA B200", "sm100", "3.6.0"))
    assert lc.supports_l2_prefetch(CUDA0)


def test_tuner_prefetch_distance_keeps_the_bytes_ahead_at_every_block(monkeypatch):
    monkeypatch.setattr(lc, "supports_l2_prefetch", lambda device: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"multi_processor_count": 132}))
    assert tune.prefetch_candidates(CUDA0, 256) == [0, 8 * 132]
    assert tune.prefetch_candidates(CUDA0, 1024) == [0, 2 * 132]
    assert tune.prefetch_candidates(CUDA0, 131072) == [0, 2]
    assert tune.prefetch_candidates(CUDA0, 1 << 20) == [0, 1]  # never below one program


def test_8bit_step_borrows_the_fp32_steps_shape_not_its_cap(fake_gpu):
    _write(fake_gpu, {FAKE.entry_key("fused_adamw", "16bit"): {"block_size": 256, "num_warps": 1, "max_registers": 40}})
    lc.reload_cache()
    assert lc.launch_config(CUDA0).max_registers == 40
    assert lc.launch_config(CUDA0, lc.FUSED_STEP_8BIT) == lc.LaunchConfig(256, 1, max_registers=None)


@pytest.mark.parametrize("cap, why", [(300, "max_registers 300"), (True, "max_registers True"), ("64", "max_registers '64'")])
def test_cache_entry_register_cap_is_checked(cache, cap, why):
    with pytest.raises(tuning_cache.CacheFormatError, match=why):
        tuning_cache.write(cache, {"k": {"block_size": 256, "num_warps": 1, "max_registers": cap}})


def test_cache_entry_register_cap_round_trips(fake_gpu):
    trial = tune.Trial(lc.FUSED_STEP_8BIT, 256, 1, 1.17, 3000.0, 0.7, max_registers=64)
    best = tune.choose([_trial("fused_adamw", 1024, 4, 1.5), trial])
    assert best[lc.FUSED_STEP_8BIT] is trial
    entries = tune.cache_entries(best, FAKE, torch.bfloat16, "llama3-8b", 4296.0)
    assert entries[FAKE.entry_key(lc.FUSED_STEP_8BIT, "16bit")]["max_registers"] == 64
    assert "max_registers" not in entries[FAKE.entry_key(lc.FUSED_STEP, "16bit")]
    tuning_cache.write(fake_gpu, entries)
    lc.reload_cache()
    assert lc.launch_config(CUDA0, lc.FUSED_STEP_8BIT) == lc.LaunchConfig(256, 1, max_registers=64)
    assert lc.launch_config(CUDA0) == lc.LaunchConfig(1024, 4)


# ------------------------------------------------------------------------------ interpreter / CPU
def test_interpreter_and_cpu_are_unchanged(cache, monkeypatch):
    """Whatever is cached or set in the environment, CPU lookups give the large interpreter programs."""
    _write(cache, {"anything|sm90|triton 3.6.0|fused_adamw|16bit": {"block_size": 512, "num_warps": 2}})
    monkeypatch.setenv(lc.LAUNCH_ENV, "512x2")
    cpu = torch.device("cpu")
    assert lc.default_block_size(cpu) == lc.INTERPRETER_BLOCK_SIZE == 16384
    assert lc.launch_config(cpu).source == "interpreter"
    for block in (64, 256, 1024, 2048, 4096, 16384, 65536):
        assert lc.default_num_warps(block) == max(4, min(16, block // 256))
    with lc.override(512, 2):
        assert lc.default_block_size(cpu) == 16384


def test_interpreter_tables_keep_the_interpreter_block(cache, monkeypatch):
    if not K.interpreted():
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setenv(lc.LAUNCH_ENV, "512x2")
    tables = K.BlockTables.build([torch.randn(100)], [0], [True])
    assert (tables.block_size, tables.num_warps) == (16384, 16)


# ------------------------------------------------------------------------------------ the tuner
def _trial(kernel, block, warps, ms):
    return tune.Trial(kernel, block, warps, ms, 1.0, 0.9)


def test_choose_takes_the_fastest_step_then_the_other_kernels_at_its_block():
    trials = [_trial("fused_adamw", 1024, 4, 1.50), _trial("fused_adamw", 2048, 8, 1.60),
              _trial("block_load", 1024, 4, 0.80), _trial("block_load", 1024, 8, 0.75),
              _trial("block_load", 2048, 8, 0.50),  # faster, but at a block the tables will not use
              _trial("grad_sq_norm", 1024, 2, 0.10), _trial("grad_sq_norm", 1024, 4, 0.12)]
    best = tune.choose(trials)
    assert (best["fused_adamw"].block_size, best["fused_adamw"].num_warps) == (1024, 4)
    assert (best["block_load"].block_size, best["block_load"].num_warps) == (1024, 8)
    assert (best["grad_sq_norm"].block_size, best["grad_sq_norm"].num_warps) == (1024, 2)
    with pytest.raises(ValueError, match="no fused-step trials"):
        tune.choose(trials[2:])


def test_cache_entries_round_trip_through_the_lookup(fake_gpu):
    best = tune.choose([_trial("fused_adamw", 1024, 4, 1.5), _trial("block_load", 1024, 8, 0.7)])
    tuning_cache.write(fake_gpu, tune.cache_entries(best, FAKE, torch.bfloat16, "llama3-8b", 4296.0))
    lc.reload_cache()
    assert lc.launch_config(CUDA0) == lc.LaunchConfig(1024, 4)
    assert lc.launch_config(CUDA0, lc.BLOCK_LOAD) == lc.LaunchConfig(1024, 8)
    assert lc.launch_config(CUDA0, dtype=torch.float32) == lc.LaunchConfig(2048, 8)  # another dtype class


def test_write_choice_reports_an_unwritable_cache(fake_gpu, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(tuning_cache.CACHE_ENV, str(blocker / "sub"))  # a directory below a file
    lines = []
    best = tune.choose([_trial("fused_adamw", 1024, 4, 1.5)])
    assert tune.write_choice(best, CUDA0, torch.bfloat16, "llama3-8b", 4296.0, log=lines.append) is None
    assert "could not write the launch cache" in lines[0] and "BADAM_EXT_CACHE" in lines[0]
    monkeypatch.setenv(tuning_cache.CACHE_ENV, str(tmp_path / "ok"))
    assert tune.write_choice(best, CUDA0, torch.bfloat16, "llama3-8b", 4296.0, log=lines.append) is not None
    assert lc.launch_config(CUDA0) == lc.LaunchConfig(1024, 4)


def test_bytes_per_param():
    assert tune.bytes_per_param(lc.FUSED_STEP, torch.bfloat16) == 28
    assert tune.bytes_per_param(lc.BLOCK_LOAD, torch.bfloat16) == 14
    assert tune.bytes_per_param(lc.FUSED_STEP, torch.float32) == 32
    assert tune.bytes_per_param(lc.FUSED_STEP_8BIT, torch.bfloat16) == 16 + 16 / 256


def test_tuner_cli_refuses_without_a_gpu(capsys):
    if torch.cuda.is_available() and not K.interpreted():
        pytest.skip("a GPU is present")
    assert tune.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_interpreted_sweep_runs_every_candidate():
    if not K.interpreted():
        pytest.skip("needs TRITON_INTERPRET=1")
    trials = tune.sweep([(300,), (70,)], torch.device("cpu"), torch.bfloat16, 1.0, blocks=[64, 256], warps=[4],
                        rep_ms=1)
    # the 8-bit step only where a program covers a whole quantization block
    assert {(t.kernel, t.block_size) for t in trials} == (
        {(k, b) for k in lc.KERNELS for b in (64, 256)} - {(lc.FUSED_STEP_8BIT, 64)})
    assert {t.max_registers for t in trials if t.kernel == lc.FUSED_STEP_8BIT} == set(tune.REGISTER_CAPS_8BIT)
    assert {(t.max_registers, t.prefetch) for t in trials if t.kernel == lc.FUSED_STEP_8BIT} == {
        (cap, d) for cap in tune.REGISTER_CAPS_8BIT for d in tune.prefetch_candidates(torch.device("cpu"))}
    assert set(tune.choose(trials)) == set(lc.KERNELS)
    assert all(t.ms > 0 for t in trials)


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_tune_writes_the_cache_and_tables_use_it(cache):
    device = torch.device("cuda", torch.cuda.current_device())
    _, trials, best = tune.tune(device, "llama3.2-1b", torch.bfloat16, [1024, 2048], [4, 8], copy_gib=0.5,
                                warmup_ms=5, rep_ms=20, log=lambda _: None)
    eight_bit = len(tune.REGISTER_CAPS_8BIT) * len(tune.prefetch_candidates(device))
    assert len(trials) == 2 * 2 * (len(lc.KERNELS) - 1 + eight_bit)
    entries = tuning_cache.read(cache)
    key = lc.device_key(device)
    assert set(entries) == {key.entry_key(k, "16bit") for k in lc.KERNELS}
    step = best[lc.FUSED_STEP]
    tables = K.BlockTables.build([torch.zeros(5000, device=device, dtype=torch.bfloat16)], [0], [True])
    assert (tables.block_size, tables.num_warps) == (step.block_size, step.num_warps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_step_is_bit_identical_across_launch_configs(cache):
    """The launch configuration changes how elements are split among programs, never a result."""
    device = torch.device("cuda", torch.cuda.current_device())
    results = []
    for block, warps in [(512, 2), (1024, 4), (4096, 8)]:
        with lc.override(block, warps):
            layer = tune._Layer([(1000, 37), (4097,), (1,)], device, torch.bfloat16)
            fns = tune._kernel_fns(layer, block)
            fns[lc.FUSED_STEP]()
            fns[lc.FUSED_STEP]()
            torch.cuda.synchronize()
            results.append([r.clone() for r in layer.regions] + [w.clone() for w in layer.weights])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_8bit_step_is_bit_identical_with_and_without_a_register_cap(cache):
    """A register cap changes spills and occupancy, never a result: codes, scales, master, weights."""
    device = torch.device("cuda", torch.cuda.current_device())
    results = []
    for block, warps, cap in [(256, 1, None), (256, 1, 64), (256, 1, 40), (512, 2, 64)]:
        with lc.override(block, warps, cap):
            layer = tune._Layer([(1000, 37), (4097,), (1,)], device, torch.bfloat16)
            offsets, _ = layer.regions_8bit()
            tables = K.BlockTables.build(layer.weights, offsets, layer.decay, block_size=block, states="8bit")
            assert tables.step_max_registers == cap
            step = tune._step_8bit_fn(layer, block)
            step()
            step()
            torch.cuda.synchronize()
            _, regions = layer.regions_8bit()
            results.append([r.clone() for r in regions] + [w.clone() for w in layer.weights])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_block_tables_ask_for_each_kernels_configuration_with_the_weight_dtype(monkeypatch):
    from badam_ext.kernels import tables as T

    asked = []

    def block_size(device, kernel=lc.FUSED_STEP, dtype=None):
        asked.append(("block", kernel, dtype))
        return 1024

    def warps(block, device=None, kernel=lc.FUSED_STEP, dtype=None):
        asked.append(("warps", kernel, dtype, block))
        return {lc.FUSED_STEP: 4, lc.BLOCK_LOAD: 8, lc.GRAD_SQ_NORM: 2}[kernel]

    monkeypatch.setattr(T, "default_block_size", block_size)
    monkeypatch.setattr(T, "default_num_warps", warps)
    weights = [torch.zeros(3000, dtype=torch.float32), torch.zeros(5, dtype=torch.float32)]
    tables = T.BlockTables.build(weights, [0, 3072], [True, False])
    assert ("block", lc.FUSED_STEP, torch.float32) in asked
    assert {a[1] for a in asked if a[0] == "warps"} == {lc.FUSED_STEP, lc.BLOCK_LOAD, lc.GRAD_SQ_NORM}
    assert all(a[2] is torch.float32 and a[3] == 1024 for a in asked if a[0] == "warps")
    assert tables.block_size == 1024 and tables.num_warps == 4
    assert (tables.warps_for(lc.BLOCK_LOAD), tables.warps_for(lc.GRAD_SQ_NORM)) == (8, 2)
    assert tables.step_max_registers is None  # the interpreter never caps registers

    # 8-bit tables: the block, the step's warps and its register cap come from the 8-bit step's entry
    asked.clear()
    monkeypatch.setattr(T, "default_max_registers",
                        lambda block, nw, device, kernel=lc.FUSED_STEP, dtype=None: 64 if kernel == lc.FUSED_STEP_8BIT else None)
    warps_of = {lc.FUSED_STEP_8BIT: 1, lc.BLOCK_LOAD: 8, lc.GRAD_SQ_NORM: 2}
    monkeypatch.setattr(T, "default_num_warps", lambda block, device=None, kernel=lc.FUSED_STEP, dtype=None:
                        asked.append(("warps", kernel, dtype, block)) or warps_of[kernel])
    tables = T.BlockTables.build(weights, [0, 3072], [True, False], states="8bit")
    assert ("block", lc.FUSED_STEP_8BIT, torch.float32) in asked
    assert {a[1] for a in asked if a[0] == "warps"} == {lc.FUSED_STEP_8BIT, lc.BLOCK_LOAD, lc.GRAD_SQ_NORM}
    assert tables.num_warps == 1 and tables.step_max_registers == 64
    assert tables.step_prefetch == 0  # the interpreter never prefetches
    monkeypatch.setattr(T, "default_prefetch",
                        lambda block, nw, device, kernel=lc.FUSED_STEP, dtype=None: 7 if kernel == lc.FUSED_STEP_8BIT else 0)
    assert T.BlockTables.build(weights, [0, 3072], [True, False], states="8bit").step_prefetch == 7
