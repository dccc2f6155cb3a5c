"""The paper's 2-D toy: main |theta|^2, auxiliary |theta - 1|^2 and a non-gradient auxiliary field.

    .venv/bin/python examples/toys/paper_toy.py        # writes runs/toys/paper.png and paper_field.png
(same as `gradsim toy --problem paper` and `--problem paper_field`)
"""

from lightning_gradsim.experiments.toys import plot_trajectories, run_toy

RULES = ["main_only", "sum", "unweighted", "weighted", "projection"]

if __name__ == "__main__":
    for problem in ("paper", "paper_field"):
        paths = run_toy(problem, RULES, steps=200, lr=0.05)
        print(plot_trajectories(problem, paths, f"runs/toys/{problem}.png"))
        for rule, traj in paths.items():
            print(f"  {rule:<11} ends at {traj[-1, 0].tolist()} (main minimum: [0, 0])")
