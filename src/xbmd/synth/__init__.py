"""The virtual QCT cohort: synthetic hip patients with CT, phantom, X-rays and ground truth."""
