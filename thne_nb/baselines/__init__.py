"""The baselines t-HNE is compared with, trained in the same framework: MMIM (`mmim`) and MCEN (`mcen`)."""
