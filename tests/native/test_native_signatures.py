"""The ctypes signatures of the C kernels come from their definitions in codecs.c."""

from __future__ import annotations

import ctypes
import pathlib
import re

import pytest

from commhooks import native

SOURCE = pathlib.Path(native.__file__).with_name("codecs.c").read_text()


def test_a_definition_gives_its_restype_and_argtypes() -> None:
    text = """
static int helper(int a) { return a; }
int64_t CH(ch_demo)(const float *g, float *e, int64_t n,
                    float t, void **handle, uint32_t s0, int nthreads) {
    return 0;
}
void CH(ch_empty)(void) {}
double CH(ch_total)(const uint8_t *data, double w) { return w; }
"""
    assert native.signatures(text) == {
        "ch_demo": (
            ctypes.c_int64,
            [
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_int64,
                ctypes.c_float,
                ctypes.c_void_p,
                ctypes.c_uint32,
                ctypes.c_int,
            ],
        ),
        "ch_empty": (None, []),
        "ch_total": (ctypes.c_double, [ctypes.c_void_p, ctypes.c_double]),
    }


def test_an_unknown_c_type_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'size_t n'"):
        native.signatures("void CH(ch_bad)(size_t n) {}")


def test_every_exported_kernel_is_in_the_table() -> None:
    exported = set(re.findall(r"CH\((ch_\w+)\)\(", SOURCE))
    table = native.signatures()
    assert exported and set(table) == exported
    # Spot checks against the C: a returned count, a float threshold, the seed halves.
    assert table["ch_select"] == (
        ctypes.c_int64,
        [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
         ctypes.c_void_p, ctypes.c_int],
    )  # fmt: skip
    assert table["ch_uniform_encode"][1][9:11] == [ctypes.c_uint32, ctypes.c_uint32]


def test_the_loaded_library_binds_every_kernel() -> None:
    kernels = native.lib()
    if kernels is None:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    for name, (res, args) in native.signatures().items():
        fn = getattr(kernels, name)
        assert fn.restype is res and list(fn.argtypes) == args
