"""The paper's Figure 2 toys: convergence time over random starts, per row and rule.

    .venv/bin/python examples/toys/figure2.py   # writes runs/toys/figure2.png
(same as `gradsim toy figure2`, which also writes figure2.md and figure2.csv)
"""

from lightning_gradsim.experiments.toy_figure2 import figure2_markdown, figure2_table, plot_figure2

if __name__ == "__main__":
    table, raw = figure2_table()
    print(plot_figure2(raw, "runs/toys/figure2.png"))
    print(figure2_markdown(table))
