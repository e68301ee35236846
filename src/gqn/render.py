"""gqn-render: fly through a scene generated from one or more context views (GIF, MP4, contact sheet).

    gqn-render ckpt_path=outputs/latest/checkpoints/last.ckpt scene_index=3 num_context=1
    gqn-render ckpt_path=... context_file=my_views.yaml trajectory.frames=72
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from gqn import CONF_DIR
from gqn.cli import (
    UserError,
    check_options,
    check_writable,
    checked_overrides,
    finite_number,
    one_line_errors,
    require_ckpt_path,
)
from gqn.eval import load_module
from gqn.precision import flush_denormals

if TYPE_CHECKING:  # torch, numpy and the media libraries load where they are used: `gqn-render --help` answers fast
    import numpy as np
    import torch


def _uint8(img: torch.Tensor, scale: int = 1) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] -> uint8 ``[H*scale, W*scale, 3]`` (nearest-neighbour upscaling)."""
    from callbacks.media import to_uint8

    a = to_uint8(img)
    return a.repeat(scale, 0).repeat(scale, 1) if scale > 1 else a


def _is_camera(value) -> bool:
    """``[x, y, z, yaw, pitch]``: five finite numbers."""
    return isinstance(value, list) and len(value) == 5 and all(finite_number(c) for c in value)


def context_from_file(path: str, image_size: int):
    """Context from a YAML/JSON file ``{images: [...], cameras: [[x, y, z, yaw, pitch], ...]}``."""
    import numpy as np
    import torch
    import yaml
    from PIL import Image

    from gqn.trajectory import pose_from_camera

    p = Path(path)
    if not p.is_file():
        raise UserError(f"context_file {path} does not exist")
    try:
        spec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"context_file {path} is not valid YAML/JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(spec, dict) or "images" not in spec or "cameras" not in spec:
        raise UserError(f"context_file {path} must be a mapping with 'images' and 'cameras' lists")
    images, cameras = spec["images"], spec["cameras"]
    if not isinstance(images, list) or not isinstance(cameras, list):
        raise UserError(f"context_file {path}: 'images' and 'cameras' must be lists, got {type(images).__name__} "
                        f"and {type(cameras).__name__}")
    if not images or len(images) != len(cameras):
        raise UserError(f"context_file {path}: {len(images)} images but {len(cameras)} cameras (need equal, >= 1)")
    imgs, poses = [], []
    for i, (img_path, cam) in enumerate(zip(images, cameras)):
        if not _is_camera(cam):
            raise UserError(f"context_file {path}: camera {i} must be 5 finite numbers [x, y, z, yaw, pitch], "
                            f"got {cam!r}")
        if not isinstance(img_path, str):
            raise UserError(f"context_file {path}: image {i} must be a file name, got {img_path!r}")
        full = (p.parent / img_path) if not Path(img_path).is_absolute() else Path(img_path)
        if not full.is_file():
            raise UserError(f"context_file {path}: image {full} does not exist")
        try:
            img = np.array(Image.open(full).convert("RGB"))
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(f"context_file {path}: cannot read image {full}: {str(err).splitlines()[0]}") from None
        if img.shape[0] != image_size or img.shape[1] != image_size:
            raise UserError(
                f"image {full} is {img.shape[1]}x{img.shape[0]} but the model takes {image_size}x{image_size}"
            )
        imgs.append(torch.from_numpy(img).permute(2, 0, 1).float() / 255)
        poses.append(pose_from_camera(*map(float, cam)))
    return torch.stack(imgs), torch.tensor(poses, dtype=torch.float32), None, None


def context_from_dataset(cfg: DictConfig, image_size: int):
    """Context views (and the remaining views as ground truth) of one dataset scene."""
    import numpy as np
    import torch

    from data_modules.records import camera_to_pose, iter_records, parse_scene

    dm = hydra.utils.instantiate(cfg.data, num_workers=0)
    if dm.image_size != image_size:
        raise UserError(f"the model renders {image_size}px images but data gives {dm.image_size}px; "
                        f"set data.image_size={image_size}")
    index = 0
    for path in dm.files(cfg.split):
        for offset, data in iter_records(path):
            if index == cfg.scene_index:
                frames, cameras = parse_scene(data, path, offset)
                if not 1 <= cfg.num_context < len(frames):
                    raise UserError(f"num_context must be in [1, {len(frames) - 1}] for this scene")
                stream = dm.stream(cfg.split, batch_size=1, context_size=1)
                imgs = [stream.decode(f, path, offset, i) for i, f in enumerate(frames)]
                imgs = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
                poses = torch.from_numpy(camera_to_pose(cameras))
                m = cfg.num_context
                return imgs[:m], poses[:m], imgs[m:], poses[m:]
            index += 1
    raise UserError(f"scene_index {cfg.scene_index} is out of range: the {cfg.split} split has {index} scenes")


def trajectory_poses(cfg: DictConfig, context_poses: torch.Tensor) -> torch.Tensor:
    import torch

    from gqn.trajectory import orbit, pose_from_camera

    t = cfg.trajectory
    if t.kind == "orbit":
        return orbit(context_poses, frames=t.frames, radius=t.radius, height=t.height, pitch=t.pitch,
                     center=tuple(t.center))
    if t.kind == "poses":
        poses = OmegaConf.to_container(t.poses) if t.poses is not None else None
        if not poses or not all(_is_camera(p) for p in poses):
            raise UserError("trajectory.kind=poses needs trajectory.poses: a list of [x, y, z, yaw, pitch] (finite "
                            f"numbers), got {poses!r}")
        return torch.tensor([pose_from_camera(*map(float, p)) for p in poses], dtype=torch.float32)
    raise UserError(f"trajectory.kind must be 'orbit' or 'poses', got {t.kind!r}")


#: gqn-render's own options: (kind, least); a tuple kind may also be null (see gqn.cli.check_options)
OPTIONS = {"scene_index": (int, 0), "num_context": (int, 1), "mean": (bool, None), "seed": (int, None),
           "batch_size": (int, 1), "fps": (float, 0.1), "scale": (int, 1), "ground_truth": (bool, None),
           "trajectory.frames": (int, 1), "trajectory.radius": ((float,), 0.0), "trajectory.height": ((float,), None),
           "trajectory.pitch": ((float,), None)}


def render(cfg: DictConfig) -> dict:
    flush_denormals()  # first: the OpenMP threads torch starts later inherit the mode
    import imageio.v3 as iio
    import numpy as np
    from PIL import Image

    require_ckpt_path(cfg)
    check_options(cfg, OPTIONS)
    if not cfg.context_file and cfg.split not in ("train", "test"):
        raise UserError(f"split must be train or test (the dataset's own splits; validation scenes are train "
                        f"scenes), got {cfg.split!r}")
    center = OmegaConf.to_container(cfg.trajectory.center) if OmegaConf.is_list(cfg.trajectory.center) else None
    if not (center and len(center) == 2 and all(finite_number(c) for c in center)):
        raise UserError(f"trajectory.center must be two numbers [x, y], got {cfg.trajectory.center!r}")
    check_writable(cfg.out_dir, "out_dir", "the output directory",
                   "set out_dir=<a writable directory>")  # before the render, not after it
    module = load_module(cfg.ckpt_path, cfg.paths.output_dir)
    size = module.model.image_size
    if cfg.context_file:
        ctx, ctx_poses, gt, gt_poses = context_from_file(cfg.context_file, size)
    else:
        ctx, ctx_poses, gt, gt_poses = context_from_dataset(cfg, size)
    poses = trajectory_poses(cfg, ctx_poses)
    views = module.render_views(ctx, ctx_poses, poses, batch_size=cfg.batch_size, mean=cfg.mean, seed=cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = np.stack([_uint8(v, cfg.scale) for v in views])
    iio.imwrite(out / "flythrough.gif", frames, duration=1000 / cfg.fps, loop=0)
    mp4 = out / "flythrough.mp4"
    iio.imwrite(mp4, frames, fps=cfg.fps, codec="libx264", macro_block_size=1)
    # contact sheet: context row, trajectory rows, and ground truth vs render for held-out views
    rows = [np.concatenate([_uint8(c, cfg.scale) for c in ctx], axis=1)]
    per_row = 12
    for i in range(0, len(frames), per_row):
        rows.append(np.concatenate(list(frames[i : i + per_row]), axis=1))
    if cfg.ground_truth and gt is not None and len(gt):
        gt_views = module.render_views(ctx, ctx_poses, gt_poses, batch_size=cfg.batch_size, mean=cfg.mean)
        rows.append(np.concatenate([_uint8(g, cfg.scale) for g in gt], axis=1))
        rows.append(np.concatenate([_uint8(g, cfg.scale) for g in gt_views], axis=1))
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255)
                            for r in rows])
    Image.fromarray(sheet).save(out / "contact_sheet.png")
    info = {"frames": len(frames), "size": list(frames.shape[1:3]), "context_views": len(ctx),
            "gif": str(out / "flythrough.gif"), "mp4": str(mp4), "contact_sheet": str(out / "contact_sheet.png"),
            "poses": poses.tolist()}
    (out / "render.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out / 'flythrough.gif'}, {mp4.name} and contact_sheet.png ({len(frames)} frames, "
          f"{len(ctx)} context views)")
    return info


@checked_overrides(CONF_DIR, "render", "gqn-render")
@hydra.main(config_path=str(CONF_DIR), config_name="render", version_base="1.3")
@one_line_errors("gqn-render")
def main(cfg: DictConfig) -> None:
    render(cfg)


if __name__ == "__main__":
    main()
