//! Weighted DPO, supervised NLL and label NLL losses over tch tensors.
