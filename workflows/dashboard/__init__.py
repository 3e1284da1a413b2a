"""The QA dashboard of label metrics (SPEC §1, §5): dataset -> subject -> recording -> frame.

- :mod:`.data`: where the tables are and the queries over them (DuckDB over the Delta
  tables' Parquet files; one recording's frames loaded on demand);
- :mod:`.overlay`: a frame's labelled rig rendered over its HMC views;
- :mod:`.views`: the Bokeh plots and tables that both front ends show;
- :mod:`.report`: ``pgt report``, one self-contained offline HTML file;
- :mod:`.serve`: ``pgt dashboard``, the same views served live with Panel.

docs/qa-report.md describes the views and how to read them.
"""
