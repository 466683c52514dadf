import pytest

# the shared assertions in helpers.py report their operands like a test module's do
pytest.register_assert_rewrite(f"{__name__}.helpers")
