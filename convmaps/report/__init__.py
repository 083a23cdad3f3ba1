"""The static site of an output folder (`convmaps report`) and the text summary of `convmaps
show`: both read only what is on disk."""

from convmaps.report.site import REPORT, build_report, remove_report

__all__ = ["REPORT", "build_report", "remove_report"]
