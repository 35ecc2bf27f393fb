"""Prompt datasets: HPD v2 (the paper's prompts), local prompt files, and any Hub dataset.

:func:`load_prompts` turns any of these into a ``datasets.Dataset`` with the prompts in one column, ready
for :class:`~trl_flow_egrpo.EGRPOTrainer` (``train_dataset`` / ``eval_dataset``)::

    load_prompts("ymhao/HPDv2")                          # HPD v2 training prompts (unique), ~107k
    load_prompts("ymhao/HPDv2", split="test")            # the 400 HPD v2 test prompts (paper's evaluation)
    load_prompts("zhwang/HPDv2", split="photo")          # HPSv2 benchmark prompts of one style (+ 'style')
    load_prompts("zhwang/HPDv2", split="all")            # all four benchmark styles, 3,200 prompts
    load_prompts("my_prompts.txt")                       # one prompt per line
    load_prompts("prompts.csv", prompt_column="caption") # csv/json/jsonl/parquet with a prompt column
    load_prompts("some-user/some-dataset", split="train", prompt_column="text")

The two HPD v2 repositories are read file by file (``hf_hub_download``), because ``ymhao/HPDv2`` ships a
loading script that ``datasets >= 4`` no longer runs. With ``local_dir`` the same files are read from a
local copy laid out as the Hub repository (e.g. made by ``hf download ymhao/HPDv2 test.json --repo-type
dataset --local-dir hpd``), so nothing is downloaded; the two repositories' files do not collide, so one
directory can hold both.
"""

from __future__ import annotations

import functools
import os

import datasets
import torch

HPD_REPO_ID = "ymhao/HPDv2"
"""HPD v2 (Wu et al., 2023): ``train.json`` (~107k prompts with image pairs) and ``test.json`` (400 prompts)."""
HPD_SPLIT_FILES = {"train": "train.json", "test": "test.json"}

HPD_BENCHMARK_REPO_ID = "zhwang/HPDv2"
"""The HPSv2 benchmark: ``benchmark/<style>.json``, each a JSON list of 800 prompt strings."""
HPD_BENCHMARK_STYLES = ("anime", "concept-art", "paintings", "photo")

# Builder of `datasets.load_dataset` for each local file extension (.txt files are read directly).
_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_prompts(
    source: str,
    split: str = "train",
    prompt_column: str = "prompt",
    *,
    local_dir: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load prompts as a ``datasets.Dataset`` whose ``prompt_column`` holds the prompt strings.

    Args:
        source: where the prompts are:

            - ``"ymhao/HPDv2"``: HPD v2; ``split`` is ``"train"`` or ``"test"``. Only the unique prompts
              are kept (in order of first appearance), in a single column.
            - ``"zhwang/HPDv2"``: the HPSv2 benchmark; ``split`` is a style (``"anime"``,
              ``"concept-art"``, ``"paintings"``, ``"photo"``) or ``"all"``. A ``style`` column says which
              style each prompt belongs to.
            - a local ``.txt`` (one prompt per line, blank lines skipped), ``.csv``, ``.json`` (a list of
              objects, or a list of strings), ``.jsonl`` or ``.parquet`` file;
            - anything else goes to ``datasets.load_dataset(source, split=split)``: a Hub dataset name
              or a local dataset directory.
        split: the split (or HPD benchmark style) to load; ignored for single local files.
        prompt_column: the column holding the prompts. Files without named columns (``.txt``, a JSON
            list of strings) and the HPD repositories get their prompts put in this column.
        local_dir: a local copy of an HPD repository (same file layout as on the Hub), used instead of
            downloading. Ignored for other sources.
        cache_dir: the ``datasets`` cache directory (default: ``datasets``' own).

    Returns:
        The dataset, with every other column of the source kept (the trainer passes them to the rewards).

    Raises:
        ValueError: unknown HPD split or style, empty dataset, or no ``prompt_column`` (the message lists
            the columns there are and names the option that selects the column).
        FileNotFoundError: ``local_dir`` lacks the file the split needs.
    """
    if source == HPD_REPO_ID:
        dataset = _load_hpd(split, prompt_column, local_dir, cache_dir)
    elif source == HPD_BENCHMARK_REPO_ID:
        dataset = _load_hpd_benchmark(split, prompt_column, local_dir, cache_dir)
    elif os.path.isfile(source):
        dataset = _load_file(source, prompt_column, cache_dir)
    else:
        dataset = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    _check_prompts(dataset, prompt_column, source)
    return dataset


def _hpd_file(repo_id: str, filename: str, local_dir: str | None) -> str:
    """Path of ``filename`` of the HPD dataset repo ``repo_id``: in ``local_dir``, or downloaded."""
    if local_dir is not None:
        path = os.path.join(local_dir, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} does not exist. local_dir must hold a copy of the Hub dataset {repo_id} laid out as on the "
                f"Hub; fetch the file with `hf download {repo_id} {filename} --repo-type dataset --local-dir "
                f"{local_dir}`."
            )
        return path
    # Looked up on the module at call time, so that tests (and users) can redirect downloads.
    import huggingface_hub

    return huggingface_hub.hf_hub_download(repo_id, filename, repo_type="dataset")


def _unique_prompts(dataset: datasets.Dataset, prompt_column: str) -> datasets.Dataset:
    # dict keeps insertion order: the first appearance of every prompt, in file order.
    prompts = dict.fromkeys(dataset["prompt"])
    return datasets.Dataset.from_dict({prompt_column: list(prompts)})


def _load_hpd(split: str, prompt_column: str, local_dir: str | None, cache_dir: str | None) -> datasets.Dataset:
    if split not in HPD_SPLIT_FILES:
        raise ValueError(
            f"{HPD_REPO_ID} has the splits {sorted(HPD_SPLIT_FILES)}, got {split!r}. For the HPSv2 "
            f"benchmark styles load '{HPD_BENCHMARK_REPO_ID}' with split one of "
            f"{list(HPD_BENCHMARK_STYLES) + ['all']}."
        )
    path = _hpd_file(HPD_REPO_ID, HPD_SPLIT_FILES[split], local_dir)
    dataset = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache_dir)
    return _unique_prompts(dataset.select_columns(["prompt"]), prompt_column)


def _load_hpd_benchmark(
    split: str, prompt_column: str, local_dir: str | None, cache_dir: str | None
) -> datasets.Dataset:
    styles = HPD_BENCHMARK_STYLES if split == "all" else (split,)
    if not set(styles) <= set(HPD_BENCHMARK_STYLES):
        raise ValueError(
            f"The {HPD_BENCHMARK_REPO_ID} benchmark has the styles {list(HPD_BENCHMARK_STYLES)} "
            f"(or 'all'), got split={split!r}."
        )
    parts = []
    for style in styles:
        path = _hpd_file(HPD_BENCHMARK_REPO_ID, f"benchmark/{style}.json", local_dir)
        # Each file is a JSON list of strings, which the json builder reads into a 'text' column.
        part = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache_dir)
        part = part.rename_column("text", prompt_column)
        parts.append(part.add_column("style", [style] * len(part)))
    return datasets.concatenate_datasets(parts)


def _load_file(path: str, prompt_column: str, cache_dir: str | None) -> datasets.Dataset:
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".txt", *_FILE_BUILDERS):
        raise ValueError(
            f"Cannot read prompts from {path}: supported files are {sorted(['.txt', *_FILE_BUILDERS])} "
            "(.txt: one prompt per line)."
        )
    if extension == ".txt":
        with open(path, encoding="utf-8") as handle:
            return datasets.Dataset.from_dict({prompt_column: [line.strip() for line in handle if line.strip()]})
    dataset = datasets.load_dataset(_FILE_BUILDERS[extension], data_files=path, split="train", cache_dir=cache_dir)
    # A JSON list of strings comes back as a single 'text' column: it holds the prompts.
    if dataset.column_names == ["text"] and prompt_column != "text":
        dataset = dataset.rename_column("text", prompt_column)
    return dataset


def _check_prompts(dataset: datasets.Dataset, prompt_column: str, source: str) -> None:
    if prompt_column not in dataset.column_names:
        raise ValueError(
            f"{source} has no prompt column '{prompt_column}'; its columns are {dataset.column_names}. "
            "Choose the column with `prompt_column` (EGRPOConfig.prompt_column, `--prompt_column` in "
            "the example scripts)."
        )
    if len(dataset) == 0:
        raise ValueError(f"{source} holds no prompts.")


def as_prompt_dataset(data, prompt_column: str = "prompt", role: str = "train_dataset"):
    """``data`` as something the trainer indexes row by row: a ``datasets.Dataset`` (or any sized,
    indexable collection of dicts) is kept; a list of prompt strings, or of dicts, becomes a ``Dataset``.

    Raises:
        ValueError: empty data, rows that are neither strings nor dicts, no ``prompt_column``, or a prompt that is
            not a string (None, a number; :func:`check_prompt_values`); the message names ``role`` and the fix.
    """
    if isinstance(data, (list, tuple)):
        # Prompt strings with a few Nones or numbers among them: name the first bad row.
        if any(isinstance(row, str) for row in data) and not any(isinstance(row, dict) for row in data):
            check_prompt_values(data, f"{role} (a list of prompts)", prompt_column)
            data = datasets.Dataset.from_dict({prompt_column: list(data)})
        elif data and all(isinstance(row, dict) for row in data):
            if all(prompt_column in row for row in data):  # before Arrow, which fails on mixed types unhelpfully
                check_prompt_values([row[prompt_column] for row in data], role, prompt_column)
            data = datasets.Dataset.from_list(list(data))
        elif data:
            kinds = sorted({type(row).__name__ for row in data})
            raise ValueError(
                f"{role} is a list of {', '.join(kinds)}: pass prompt strings, dicts with a "
                f"'{prompt_column}' key, or a datasets.Dataset."
            )
    if len(data) == 0:
        raise ValueError(
            f"{role} is empty: pass a dataset with at least one prompt, e.g. "
            "Dataset.from_dict({'prompt': ['a photo of a cat']})."
        )
    columns = getattr(data, "column_names", None)
    if columns is None:
        first = data[0]
        if not isinstance(first, dict):
            raise ValueError(
                f"{role}'s rows are {type(first).__name__}, not dicts: pass a datasets.Dataset, a list "
                "of prompt strings, or a list of dicts."
            )
        columns = list(first)
    if prompt_column not in columns:
        raise ValueError(
            f"{role} has no prompt column '{prompt_column}' (columns: {columns}). Rename the column "
            f"(dataset.rename_column(..., '{prompt_column}')) or set EGRPOConfig.prompt_column."
        )
    check_prompt_values(_column_values(data, prompt_column), role, prompt_column)
    return data


def _column_values(data, column: str):
    """The values of ``column`` in every row of ``data``: read as one column from a ``datasets.Dataset`` (fast),
    row by row from any other indexable collection of dicts."""
    if isinstance(data, datasets.Dataset):
        return list(data[column])
    return [data[index][column] for index in range(len(data))]


def check_prompt_values(prompts, role: str, prompt_column: str) -> None:
    """Every prompt must be a string: a None (an empty cell) or a number would reach the text encoders and fail
    deep inside a tokenizer mid-run, or be encoded as its text ("None").

    Raises:
        ValueError: naming ``role``, the column, the first bad row's index and value, how many rows are bad, and
            the fix.
    """
    bad = [index for index, prompt in enumerate(prompts) if not isinstance(prompt, str)]
    if bad:
        first = bad[0]
        raise ValueError(
            f"{role}: the prompt in column '{prompt_column}' of row {first} is {prompts[first]!r} "
            f"({type(prompts[first]).__name__}), not a string ({len(bad)} of {len(prompts)} rows are not strings). "
            "Every prompt must be a string: drop or fill those rows, e.g. "
            f"dataset.filter(lambda row: isinstance(row['{prompt_column}'], str)), or choose the column of text "
            "prompts with EGRPOConfig.prompt_column."
        )


@functools.lru_cache(maxsize=4)
def epoch_order(epoch: int, size: int, seed: int, shuffle: bool = True) -> tuple[int, ...]:
    """The order in which epoch ``epoch`` visits the ``size`` prompts: a seeded permutation (the same for
    every process, so their slices are disjoint), or ``0..size-1`` without ``shuffle``."""
    if not shuffle:
        return tuple(range(size))
    return tuple(torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch)).tolist())


def iteration_prompt_indices(
    iteration: int,
    size: int,
    per_process: int,
    process_index: int = 0,
    num_processes: int = 1,
    seed: int = 0,
    shuffle: bool = True,
) -> list[int]:
    """Dataset indices of one process's prompts for ``iteration``.

    A pure function of its arguments, so resuming needs no data-loader state. Iteration ``i`` consumes
    positions ``[i * N * p, (i + 1) * N * p)`` of the stream of epochs (``N`` processes, ``p`` prompts per
    process), process ``r`` the ``r``-th slice of ``p`` of them; position ``q`` is item ``q mod size`` of
    epoch ``q // size`` (:func:`epoch_order`). Every epoch visits every prompt exactly once.
    """
    first = (iteration * num_processes + process_index) * per_process
    return [
        epoch_order(position // size, size, seed, shuffle)[position % size]
        for position in range(first, first + per_process)
    ]


def padded_shard(size: int, process_index: int, num_processes: int) -> list[int]:
    """Process ``process_index``'s share of ``size`` items, in order: ``ceil(size / N)`` consecutive indices,
    the last ones repeating item ``size - 1`` where the items run out, so that every process gets the same
    count (``gather`` needs equal shapes). The first ``size`` gathered results are the items' in order."""
    per_process = -(-size // num_processes)
    first = process_index * per_process
    return [min(i, size - 1) for i in range(first, first + per_process)]


def load_source_image(value):
    """A dataset row's source image (for image-editing pipelines) as an RGB ``PIL.Image``: from a file path, a PIL
    image, or an array ``[H, W, 3]`` (uint8 values, or floats in [0, 1]; nested lists as ``datasets`` stores
    arrays). :func:`check_source_images` validates the same values with clear errors; this assumes valid input."""
    import numpy as np
    from PIL import Image

    if isinstance(value, (str, os.PathLike)):
        with Image.open(value) as image:
            return image.copy()  # read fully, so the file is closed
    if isinstance(value, Image.Image):
        return value
    array = np.asarray(value)
    if array.dtype.kind == "f":
        array = np.rint(array * 255)
    return Image.fromarray(array.astype(np.uint8), mode="RGB")


def check_source_images(data, image_column: str, role: str, pipeline_name: str) -> None:
    """Check that every row of ``data`` has a usable source image in ``image_column``: the column exists, and each
    value is a readable RGB image file, an RGB PIL image, or an RGB array ``[H, W, 3]`` (uint8, or floats in
    [0, 1]).

    Raises:
        ValueError: naming ``role``, the row, the problem (missing column, missing or unreadable file, wrong mode,
            wrong shape or values) and the fix.
    """
    columns = getattr(data, "column_names", None) or list(data[0])
    if image_column not in columns:
        raise ValueError(
            f"{role} has no source-image column '{image_column}' (columns: {columns}), and {pipeline_name} edits a "
            "source image per prompt. Add a column of image paths, PIL images or RGB arrays [H, W, 3], or set "
            "EGRPOConfig.image_column to the column that holds them (docs/editing.md)."
        )
    for index, value in enumerate(_column_values(data, image_column)):
        problem = _source_image_problem(value)
        if problem is not None:
            raise ValueError(f"{role}: the source image in column '{image_column}' of row {index} {problem}")


def _source_image_problem(value) -> str | None:
    """Why ``value`` is not a usable source image (the rest of a sentence, with the fix), or None."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    convert = "Convert it to RGB first, e.g. PIL.Image.open(path).convert('RGB'), and save or pass that."
    if isinstance(value, (str, os.PathLike)):
        if not os.path.isfile(value):
            return (
                f"is the path {str(value)!r}, which does not exist. Fix the path (relative paths are read from the "
                "working directory) or drop the row."
            )
        try:
            with Image.open(value) as image:
                mode = image.mode
                image.verify()  # reads the whole file: a truncated or corrupt image fails here, not mid-run
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            return (
                f"is the file {str(value)!r}, which PIL cannot read as an image ({error}). Replace the file or drop "
                "the row."
            )
        if mode != "RGB":
            return f"is the file {str(value)!r}, a {mode} image, not RGB. {convert}"
        return None
    if isinstance(value, Image.Image):
        return None if value.mode == "RGB" else f"is a {value.mode} PIL image, not RGB. {convert}"
    if value is None or isinstance(value, (bool, int, float, dict, bytes)):
        return (
            f"is {value!r} ({type(value).__name__}). Give a file path, an RGB PIL image or an RGB array [H, W, 3] "
            "per row, or fill or drop the rows without one."
        )
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        return f"is not an image: {error}. Give a file path, an RGB PIL image or an RGB array [H, W, 3]."
    if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        return (
            f"is an array of shape {tuple(array.shape)}, not an RGB image [H, W, 3] (channels last). Transpose a "
            "[3, H, W] array with array.transpose(1, 2, 0); repeat a grayscale [H, W] array to 3 channels."
        )
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            return "is a float array with values outside [0, 1]. Scale it to [0, 1] or pass uint8 values 0-255."
        return None
    if array.dtype.kind not in "ui" or array.min() < 0 or array.max() > 255:
        return f"is a {array.dtype} array; give uint8 values 0-255 (or floats in [0, 1])."
    return None
