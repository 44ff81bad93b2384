"""Data: QM9 from the qm9pack wheel, xyz/SDF readers, masked batches."""
