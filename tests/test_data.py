"""Prompt loading: HPD v2 files laid out as on the Hub, local prompt files, clear errors."""

import json

import huggingface_hub
import pytest

from trl_flow_egrpo.data import HPD_BENCHMARK_STYLES, load_prompts

# Records shaped like the Hub files (ymhao/HPDv2 train.json / test.json); a prompt repeats, as in train.json.
HPD_TRAIN = [
    {"human_preference": [1, 0], "prompt": "a castle at dawn", "file_path": ["train/0.jpg", "train/1.jpg"]},
    {"human_preference": [0, 1], "prompt": "a corgi astronaut", "file_path": ["train/2.jpg", "train/3.jpg"]},
    {"human_preference": [1, 0], "prompt": "a castle at dawn", "file_path": ["train/4.jpg", "train/5.jpg"]},
]
HPD_TEST = [
    {
        "prompt": f"test prompt {i}",
        "image_path": [f"{i}_0.jpg", f"{i}_1.jpg"],
        "rank": [1, 2],
        "raw_annotations": [{"rank": [1, 2], "user_hash": "abc"}],
    }
    for i in range(3)
]


@pytest.fixture
def hpd_dir(tmp_path):
    """A local copy of ymhao/HPDv2 (train.json, test.json) and zhwang/HPDv2 (benchmark/<style>.json)."""
    (tmp_path / "train.json").write_text(json.dumps(HPD_TRAIN))
    (tmp_path / "test.json").write_text(json.dumps(HPD_TEST))
    (tmp_path / "benchmark").mkdir()
    for style in HPD_BENCHMARK_STYLES:
        (tmp_path / "benchmark" / f"{style}.json").write_text(json.dumps([f"{style} {i}" for i in range(2)]))
    return tmp_path


def test_hpd_train_and_test_prompts_are_unique(hpd_dir):
    assert load_prompts("ymhao/HPDv2", local_dir=str(hpd_dir))["prompt"] == ["a castle at dawn", "a corgi astronaut"]
    test = load_prompts("ymhao/HPDv2", split="test", local_dir=str(hpd_dir))
    assert test.column_names == ["prompt"] and len(test) == 3


def test_hpd_benchmark_styles(hpd_dir):
    photo = load_prompts("zhwang/HPDv2", split="photo", local_dir=str(hpd_dir))
    assert photo[:] == {"prompt": ["photo 0", "photo 1"], "style": ["photo", "photo"]}
    everything = load_prompts("zhwang/HPDv2", split="all", local_dir=str(hpd_dir))
    assert len(everything) == 8 and set(everything["style"]) == set(HPD_BENCHMARK_STYLES)


def test_hpd_files_are_downloaded_from_the_dataset_repos(hpd_dir, monkeypatch):
    requests = []

    def hf_hub_download(repo_id, filename, repo_type=None, **kwargs):
        requests.append((repo_id, filename, repo_type))
        return str(hpd_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    load_prompts("ymhao/HPDv2", split="test")
    load_prompts("zhwang/HPDv2", split="anime")
    assert requests == [("ymhao/HPDv2", "test.json", "dataset"), ("zhwang/HPDv2", "benchmark/anime.json", "dataset")]


def test_local_prompt_files(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red apple\n\n  a fire truck  \n")
    assert load_prompts(str(tmp_path / "prompts.txt"))["prompt"] == ["a red apple", "a fire truck"]
    (tmp_path / "prompts.csv").write_text("caption,category\na cat,animal\na dog,animal\n")
    csv = load_prompts(str(tmp_path / "prompts.csv"), prompt_column="caption")
    assert csv[:] == {"caption": ["a cat", "a dog"], "category": ["animal", "animal"]}
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a rose"}\n{"prompt": "a tulip"}\n')
    assert load_prompts(str(tmp_path / "prompts.jsonl"))["prompt"] == ["a rose", "a tulip"]
    (tmp_path / "list.json").write_text('["one", "two"]')
    assert load_prompts(str(tmp_path / "list.json"))["prompt"] == ["one", "two"]


def test_errors_name_the_fix(tmp_path):
    (tmp_path / "prompts.csv").write_text("caption\na cat\n")
    with pytest.raises(ValueError, match=r"no prompt column 'prompt'; its columns are \['caption'\].*prompt_column"):
        load_prompts(str(tmp_path / "prompts.csv"))
    with pytest.raises(ValueError, match="styles"):
        load_prompts("zhwang/HPDv2", split="test", local_dir=str(tmp_path))
    with pytest.raises(ValueError, match="splits"):
        load_prompts("ymhao/HPDv2", split="validation", local_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="hf download ymhao/HPDv2 train.json --repo-type dataset"):
        load_prompts("ymhao/HPDv2", local_dir=str(tmp_path))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
