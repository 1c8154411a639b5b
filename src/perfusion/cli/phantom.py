"""``perfusion phantom``: a synthetic DSC case with known CBV, CBF and MTT, its masks and truth maps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from perfusion.cli.options import Force, Quiet, check_options
from perfusion.errors import UsageError


def phantom(
    out: Annotated[Path, typer.Argument(help="Output folder for the phantom case.")],
    snr: Annotated[Optional[float], typer.Option(
        help="Baseline signal-to-noise ratio (S0 / noise SD, > 0; default 150, --realistic 50).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the noise (>= 0).")] = 0,
    tr: Annotated[float, typer.Option(
        help="Repetition time in s, in (0, 10] (a multiple of 0.01; --realistic: of 0.05).")] = 1.5,
    te: Annotated[Optional[float], typer.Option(
        help="Echo time in s, in (0, 0.2] (default 0.025, --realistic 0.03).")] = None,
    frames: Annotated[Optional[int], typer.Option(
        help="Number of frames, 30 to 1000 (default 80, --realistic 60).")] = None,
    leaky_lesions: Annotated[bool, typer.Option(
        "--leaky-lesions", help="Add a sixth slice of four lesions with Tofts-model contrast leakage (T1- and "
                                "T2*-dominant); slices 0-4, their masks and the grid stay the plain phantom's, "
                                "so the two compare voxel by voxel.")] = False,
    realistic: Annotated[bool, typer.Option(
        "--realistic", help="The realistic head instead (physics unlike the methods' models: quadratic "
                            "blood relaxation, log-normal residues, strong leakage, mixed lesions, scalp "
                            "and orbits); --snr defaults to 50, --te to 0.03, --frames to 60.")] = False,
    protocol: Annotated[str, typer.Option(
        help="--realistic: flip60_no_preload (default), flip60_preload or flip30_no_preload.")] = "flip60_no_preload",
    echoes: Annotated[Optional[int], typer.Option(
        help="--realistic: number of echoes in [1, 8], one series per echo (<prefix>_echo-<k>_dsc.nii.gz "
             "with its EchoTime); 2: TE 0.008 and 0.030 s, more: evenly spaced between them.")] = None,
    te_list: Annotated[Optional[str], typer.Option(
        "--te-list", help="--realistic: the echo times in s, comma-separated and increasing, each in "
                          "(0, 0.2] (e.g. 0.008,0.030); one series per echo.")] = None,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Write a synthetic DSC case with known CBV/CBF/MTT, masks and truth maps."""
    check_options(dict(locals()))
    echo_times = echo_times_from_options(echoes=echoes, te_list=te_list, te=te, realistic=realistic)
    run_phantom(out=out, snr=snr, seed=seed, tr=tr, te=te, frames=frames, leaky_lesions=leaky_lesions, force=force,
                quiet=quiet, realistic=realistic, protocol=protocol, echo_times=echo_times)


def echo_times_from_options(*, echoes: int | None, te_list: str | None, te: float | None,
                            realistic: bool) -> tuple[float, ...]:
    """The echo times (s, increasing) of ``phantom --echoes N`` / ``--te-list a,b,...``; () for one
    echo. UsageError (exit 2) naming the option: not --realistic, --te given too, a list that is not
    numbers, fewer than 2 or more than 8 echoes, a TE outside (0, 0.2] s (milliseconds named), TEs
    repeated, or --echoes that does not count the list."""
    import math

    from perfusion.quantify.echoes import MIN_ECHO_GAP_S
    from perfusion.tools.phantom_realistic import DEFAULT_ECHO_TIMES, MAX_ECHOES
    from perfusion.units import MAX_TE_S

    n_echoes = echoes if echoes is not None else 1
    if te_list is None and n_echoes == 1:
        return ()
    flag = "--te-list" if te_list is not None else "--echoes"
    if not realistic:
        raise UsageError(f"phantom: {flag} belongs to the --realistic head; add --realistic")
    if te is not None:
        raise UsageError(f"phantom: --te and {flag} do not fit together; give every echo time with --te-list")
    if te_list is None:
        lo, hi = DEFAULT_ECHO_TIMES
        return tuple(round(lo + (hi - lo) * i / (n_echoes - 1), 6) for i in range(n_echoes))
    try:
        tes = [float(x) for x in te_list.split(",")]
    except ValueError:
        raise UsageError(f"--te-list {te_list!r}: give echo times in s separated by commas, "
                         "e.g. --te-list 0.008,0.030") from None
    if not 2 <= len(tes) <= MAX_ECHOES:
        raise UsageError(f"--te-list {te_list}: give 2 to {MAX_ECHOES} echo times (one echo: use --te)")
    for x in tes:
        if not (math.isfinite(x) and 0 < x <= MAX_TE_S):
            hint = (f"; this looks like milliseconds: give seconds (e.g. {x / 1000:g})"
                    if math.isfinite(x) and 0 < x / 1000 <= MAX_TE_S else "")
            raise UsageError(f"--te-list {te_list}: each echo time must be a finite number in "
                             f"(0, {MAX_TE_S:g}] s{hint}")
    tes = sorted(tes)
    if any(b - a < MIN_ECHO_GAP_S for a, b in zip(tes, tes[1:], strict=False)):
        raise UsageError(f"--te-list {te_list}: echo times must differ by at least {MIN_ECHO_GAP_S * 1000:g} ms; give "
                         "each echo once")
    if echoes is not None and echoes != len(tes):
        raise UsageError(f"--echoes {echoes} and --te-list {te_list} ({len(tes)} echo times) do not fit together; "
                         "give one of them")
    return tuple(tes)


def run_phantom(*, out: Path, snr: float | None = None, seed: int = 0, tr: float = 1.5, te: float | None = None,
                frames: int | None = None, leaky_lesions: bool = False, force: bool = False, quiet: bool = False,
                realistic: bool = False, protocol: str = "flip60_no_preload",
                echo_times: tuple[float, ...] = ()) -> dict:
    """Write a phantom case: phantom.py's (defaults SNR 150, TE 0.025 s, 80 frames) or, ``realistic``,
    phantom_realistic.py's head (SNR 50, TE 0.03 s, 60 frames, ``protocol``; ``echo_times`` (s): one
    series per echo, keys ``echo-1``, ``echo-2``, ... instead of ``dsc``)."""
    from functools import partial

    from perfusion.io import staged_output

    snr = snr if snr is not None else (50.0 if realistic else 150.0)
    te = te if te is not None else (0.03 if realistic else 0.025)
    frames = frames if frames is not None else (60 if realistic else 80)
    if snr <= 0 or frames < 30 or tr <= 0 or te <= 0:
        raise UsageError("phantom: need --snr > 0, --frames >= 30, --tr > 0 and --te > 0")
    if realistic and leaky_lesions:
        raise UsageError("phantom: --leaky-lesions belongs to the first phantom; the --realistic head has its own "
                         "lesions")
    try:
        if realistic:
            from perfusion.tools.phantom_realistic import RealisticSpec, make_realistic_phantom, write_realistic

            realistic_ph = make_realistic_phantom(RealisticSpec(protocol=protocol, snr=snr, seed=seed, tr=tr, te=te,
                                                                n_frames=frames, echo_times=tuple(echo_times)))
            write = partial(write_realistic, realistic_ph)
        else:
            from perfusion.tools.phantom import PhantomSpec, make_phantom, write_phantom

            ph = make_phantom(PhantomSpec(snr=snr, seed=seed, tr=tr, te=te, n_frames=frames,
                                          leaky_lesions=leaky_lesions))
            write = partial(write_phantom, ph)
    except ValueError as exc:
        raise UsageError(f"phantom: {exc}") from None
    with staged_output(Path(out), force=force) as stage:
        paths = write(stage)
    if not quiet:
        from perfusion.cli.console import console

        series = (paths["dsc"].name if "dsc" in paths
                  else ", ".join(v.name for k, v in paths.items() if k.startswith("echo-")))
        console().print(f"Phantom written to {out} (series {series}, truth.json, masks, truth/)")
    return {k: Path(out) / v.relative_to(stage) for k, v in paths.items()}
