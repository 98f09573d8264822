"""QA reports: one self-contained HTML page per corrected case and a batch index.

``views`` makes the pictures, ``case`` the per-case page, ``index`` the batch overview and
``page`` the shared HTML shell; every page is written atomically.
"""

from medinpaint.report.case import report_path, write_case_report
from medinpaint.report.index import write_index
from medinpaint.report.views import busiest_cut as _busiest_cut

__all__ = ["report_path", "write_case_report", "write_index", "_busiest_cut"]
