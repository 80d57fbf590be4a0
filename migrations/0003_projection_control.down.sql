ALTER TABLE projections.checkpoints DROP COLUMN stopped;
