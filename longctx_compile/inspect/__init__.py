"""Looking at programs: snapshots of graphs, stage diffs and their renderings."""
