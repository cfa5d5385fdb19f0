import { describe, expect, it } from 'vitest';
import { hasPeer } from '../../src/peers';

it('needs no peer', () => {
  expect(1 + 1).toBe(2);
});

describe.runIf(hasPeer('blockrep-no-such-peer-tool'))('needs a peer', () => {
  it('uses it', () => {});
});
