"""`latentddpm serve`'s app without a browser (`tests/test_serve_browser.py` drives it in one) and `latentddpm
make-space`: each image's command redraws it with `latentddpm sample`, bad input is a one-line `gr.Error`, and the
Space folder has the files and metadata the Hub reads."""

import shlex
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from diffusers.utils import make_image_grid
from huggingface_hub import SpaceCard
from test_pipeline_loaders import our_pipeline, save_random_lora

import latentddpm.pipelines.pipeline_latent_ddpm as pipeline_module
from latentddpm.cli import main
from latentddpm.config import ConfigError
from latentddpm.sampling import load_pipeline, parse_lora

gr = pytest.importorskip("gradio")
from latentddpm.app import MAX_SEED, ServedPipeline  # noqa: E402 (needs gradio)

PAGE = {  # the page's values, as the widgets send them
    "prompt": "a red circle",
    "negative_prompt": "",
    "steps": 3,
    "guidance": 3.0,
    "seed": 7,
    "random_seed": False,
    "sampler": "saved",
    "num_images": 1,
    "height": 16,
    "width": 16,
    "adapter_weights": {},
}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pipeline")
    our_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("loras")
    save_random_lora(folder / "style", seed=1)
    save_random_lora(folder / "other", seed=2)
    return [str(folder / "style"), f"{folder / 'other' / 'pytorch_lora_weights.safetensors'}:second"]


@pytest.fixture(scope="module")
def served(model, loras) -> ServedPipeline:
    return ServedPipeline(str(model), loras, device="cpu")


def run_command(command: str, out: Path) -> np.ndarray:
    """Run a `latentddpm sample ...` command line in this process; its grid's pixels."""
    argv = shlex.split(command)
    assert argv[:2] == ["latentddpm", "sample"]
    main([*argv[1:], "--out", str(out)])
    return np.asarray(PIL.Image.open(out))


@pytest.mark.parametrize(
    "page",
    [
        {},  # adapters loaded but all off, the saved scheduler
        {"sampler": "dpmsolver++", "negative_prompt": "blurry", "adapter_weights": {"style": 0.5}},
        {"sampler": "euler", "num_images": 2, "width": 24, "adapter_weights": {"style": 1.0, "second": 0.3}},
    ],
    ids=["no-adapters", "one-adapter-weighted", "two-adapters-two-images"],
)
def test_each_image_is_redrawn_bitwise_by_its_sample_command(served, page, tmp_path):
    settings = served.settings(**{**PAGE, **page})
    shown = served.generate(settings)

    assert len(shown) == settings.num_images and all(caption.startswith(settings.command()) for _, caption in shown)
    grid = make_image_grid([image for image, _ in shown], rows=1, cols=len(shown))
    np.testing.assert_array_equal(run_command(shown[0][1].split("  #")[0], tmp_path / "grid.png"), np.asarray(grid))


def test_switching_adapters_changes_the_images_and_switching_back_restores_them(served):
    def draw(adapter_weights):
        [(image, _)] = served.generate(served.settings(**{**PAGE, "adapter_weights": adapter_weights}))
        return np.asarray(image)

    plain, styled = draw({}), draw({"style": 1.0})
    assert not np.array_equal(plain, styled)
    np.testing.assert_array_equal(draw({}), plain)
    np.testing.assert_array_equal(draw({"style": 1.0}), styled)


def test_progress_is_reported_after_every_denoising_step(served):
    reports = []
    served.generate(served.settings(**PAGE), progress=lambda steps, desc: reports.append(steps))
    assert reports == [(1, 3), (2, 3), (3, 3)]


def test_a_random_seed_is_drawn_and_shown_in_the_command(served):
    settings = served.settings(**{**PAGE, "seed": None, "random_seed": True})
    assert 0 <= settings.seed <= MAX_SEED and f"--seed {settings.seed} " in settings.command()


@pytest.mark.parametrize(
    "page, message",
    [
        ({"prompt": "  "}, "Enter a prompt"),
        ({"steps": 0}, "Steps must be a whole number between 1 and 1000, got 0"),
        ({"steps": 2.5}, "Steps must be a whole number"),
        ({"guidance": 21.0}, "Guidance must be between 0 and 20, got 21.0"),
        ({"seed": -1}, f"Seed must be a whole number between 0 and {MAX_SEED}, got -1"),
        ({"seed": None}, "Seed must be a whole number"),
        ({"num_images": 9}, "Images per prompt must be a whole number between 1 and 8"),
        ({"width": 18}, "Width must be a whole number between 4 and 32, a multiple of 4, got 18"),
        ({"height": 64}, "Height must be a whole number between 4 and 32"),
        ({"sampler": "heun"}, "Unknown sampler 'heun'"),
        ({"adapter_weights": {"style": 3.0}}, "Adapter 'style': weight must be between 0 and 2, got 3.0"),
    ],
)
def test_bad_input_is_a_one_line_error_naming_the_field(served, page, message):
    with pytest.raises(gr.Error) as error:
        served.settings(**{**PAGE, **page})
    assert message in error.value.message and "\n" not in error.value.message


def test_parse_lora_names_an_adapter_after_its_folder_unless_named():
    assert parse_lora("runs/my-style") == ("runs/my-style", "my_style")
    assert parse_lora("runs/style/pytorch_lora_weights.safetensors") == (
        "runs/style/pytorch_lora_weights.safetensors",
        "style",
    )
    assert parse_lora("user/repo:mine") == ("user/repo", "mine")
    with pytest.raises(ConfigError, match="NAME of letters"):
        parse_lora("runs/a:my.style")


def test_load_pipeline_refuses_mismatched_weights_and_duplicate_names_before_loading(loras):
    with pytest.raises(ConfigError, match="Got 1 LoRA weights for 2 LoRA adapters"):
        load_pipeline("no/such/model", "cpu", loras, [0.5])
    with pytest.raises(ConfigError, match="share a name"):
        load_pipeline("no/such/model", "cpu", [loras[0], loras[0]])


def test_cli_sample_reports_a_bad_lora_in_one_line(model, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "sample",
                "--model",
                str(model),
                "--prompt",
                "x",
                "--lora",
                "a",
                "--lora_weight",
                "1",
                "--lora_weight",
                "2",
            ]
        )
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: Got 2 LoRA weights for 1 LoRA adapters: give one per adapter.\n"


def test_make_space_writes_an_app_requirements_and_space_metadata(tmp_path):
    main(["make-space", "--model", "user/tiny-ldm", "--out", str(tmp_path)])

    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md", "app.py", "requirements.txt"]
    card = SpaceCard.load(tmp_path / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and card.data.models == ["user/tiny-ldm"]
    assert card.data.sdk_version == gr.__version__ and card.data.title == "tiny-ldm"
    assert (tmp_path / "requirements.txt").read_text().startswith("latentddpm[app]==")
    app = (tmp_path / "app.py").read_text()
    compile(app, "app.py", "exec")
    assert "build_demo('user/tiny-ldm')" in app


def test_push_to_hub_with_a_space_uploads_the_space_folder(monkeypatch):
    uploads = []

    class Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    class Commit:
        commit_url = "https://huggingface.co/user/tiny-ldm/commit/0"

    def create_repo(repo_id, **kwargs):
        created.append(kwargs)
        return Repo(repo_id)

    def upload_folder(*, repo_id, folder_path, repo_type=None, **kwargs):
        folder = Path(folder_path)
        models = SpaceCard.load(folder / "README.md").data.models if repo_type == "space" else None
        uploads.append((repo_id, repo_type, sorted(path.name for path in folder.iterdir()), models))
        return Commit()

    # The network boundary only: creating the repositories and uploading.
    created = []
    monkeypatch.setattr(pipeline_module, "create_repo", create_repo)
    monkeypatch.setattr(pipeline_module, "upload_folder", upload_folder)
    our_pipeline().push_to_hub("user/tiny-ldm", space_repo_id="user/tiny-ldm-demo")

    assert [kwargs.get("repo_type") for kwargs in created] == [None, "space"] and created[1]["space_sdk"] == "gradio"
    [(model_repo, _, model_files, _), space] = uploads
    assert model_repo == "user/tiny-ldm" and "model_index.json" in model_files
    assert space == ("user/tiny-ldm-demo", "space", ["README.md", "app.py", "requirements.txt"], ["user/tiny-ldm"])
