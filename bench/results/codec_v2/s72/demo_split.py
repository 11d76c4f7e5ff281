"""The split `splitkernels demo` builds (its model, split layer, codec calibration and OPSC
settings), for the session 72 measurement scripts beside this file."""
from splitkernels.cli import build_parser
from splitkernels.cli.models import calibration_ids, load_model, split_settings
from splitkernels.runtime.sessions import Limits
from splitkernels.runtime.split_model import split_model


def demo_split(flags: list[str], max_sessions: int = 4):
    """(parsed demo arguments, loaded model, SplitModel) for ``splitkernels demo`` with ``flags``."""
    args = build_parser().parse_args(["demo", *flags])
    loaded = load_model(args.model, args.family, args.seed)
    settings = split_settings(args, loaded)
    sm = split_model(settings.prepare(loaded.model), settings.split_config("both"),
                     limits=Limits(max_sessions=max_sessions, max_seq_len=4096), fast=True,
                     calibration=calibration_ids(settings, "both", args, loaded))
    return args, loaded, sm
