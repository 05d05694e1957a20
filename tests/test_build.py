"""The native extension is importable and says what it was built with."""

import subprocess
import sys

import tinyserve


def test_build_info_keys():
    info = tinyserve._C.build_info()
    for key in ("cuda", "cuda_version", "cuda_architectures", "openmp", "compiler"):
        assert key in info
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_architectures"]


def test_import_is_light():
    # `import tinyserve` must not pull in torch (start-up time of the CLI and server).
    code = "import sys, tinyserve; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
