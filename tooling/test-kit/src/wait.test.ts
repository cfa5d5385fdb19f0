import { EventEmitter } from 'node:events';
import { describe, expect, it } from 'vitest';
import { waitFor } from './wait';

describe('waitFor', () => {
  it('resolves with the first truthy value of a polled check', async () => {
    let n = 0;
    expect(await waitFor(() => ++n >= 3 && `after ${n}`, { intervalMs: 1 })).toBe('after 3');
  });

  it('takes async checks, and rejects with their error', async () => {
    let n = 0;
    expect(await waitFor(async () => ++n === 2, { intervalMs: 1 })).toBe(true);
    await expect(
      waitFor(async () => {
        throw new Error('broken check');
      }),
    ).rejects.toThrow('broken check');
  });

  it('rejects after its deadline, naming what it waited for', async () => {
    await expect(waitFor(() => false, { timeoutMs: 30, what: 'job j0 paused' })).rejects.toThrow(
      'waitFor: job j0 paused not reached within 30 ms',
    );
    let status = 'running';
    const waiting = waitFor(() => false, { timeoutMs: 30, what: () => `paused (still ${status})` });
    status = 'ready';
    await expect(waiting).rejects.toThrow('waitFor: paused (still ready) not reached within 30 ms');
  });

  it('checks on events instead of polling, and stops listening once done', async () => {
    const e = new EventEmitter();
    let state = 'running';
    let checks = 0;
    const waiting = waitFor(
      () => {
        checks++;
        return state === 'paused';
      },
      { on: [e, 'event', 'other'] },
    );
    await new Promise((r) => setTimeout(r, 30));
    expect(checks).toBe(1);
    e.emit('event');
    state = 'paused';
    e.emit('other');
    expect(await waiting).toBe(true);
    expect(checks).toBe(3);
    expect(e.listenerCount('event') + e.listenerCount('other')).toBe(0);
  });
});
