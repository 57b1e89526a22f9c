"""spatlib.allocator: the CPU malloc setting the trainer and the evaluation apply."""
import platform

import pytest

from spatlib import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="the malloc settings exist only in glibc")
def test_keep_freed_memory_is_in_force_on_glibc_and_idempotent(monkeypatch):
    monkeypatch.delenv(allocator.ENV_VAR, raising=False)
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True


def test_environment_variable_turns_it_off(monkeypatch):
    monkeypatch.setenv(allocator.ENV_VAR, "0")
    assert allocator.keep_freed_memory() is False


def test_bad_environment_value_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv(allocator.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="SPAT_KEEP_FREED_MEMORY.*'sometimes'"):
        allocator.keep_freed_memory()
