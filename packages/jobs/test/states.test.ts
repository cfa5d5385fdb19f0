import { describe, expect, it } from 'vitest';
import { JOB_STATUSES, JOB_VERBS, type JobStatus, transitionAllowed, verbAllowed } from '../src/index';

// QEMU's tables, written out as rows of allowed targets: every pair is checked both ways.
const STT: Record<JobStatus, string> = {
  //          U C R P Y S W D X E N
  undefined: '0 1 0 0 0 0 0 0 0 0 0',
  created: '  0 0 1 0 0 0 0 0 1 0 1',
  running: '  0 0 0 1 1 0 1 0 1 0 0',
  paused: '   0 0 1 0 0 0 0 0 0 0 0',
  ready: '    0 0 0 0 0 1 1 0 1 0 0',
  standby: '  0 0 0 0 1 0 0 0 0 0 0',
  waiting: '  0 0 0 0 0 0 0 1 1 0 0',
  pending: '  0 0 0 0 0 0 0 0 1 1 0',
  aborting: ' 0 0 0 0 0 0 0 0 1 1 0',
  concluded: '0 0 0 0 0 0 0 0 0 0 1',
  null: '     0 0 0 0 0 0 0 0 0 0 0',
};

const VERBS: Record<string, string> = {
  //           U C R P Y S W D X E N
  cancel: '    0 1 1 1 1 1 1 1 0 0 0',
  pause: '     0 1 1 1 1 1 0 0 0 0 0',
  resume: '    0 1 1 1 1 1 0 0 0 0 0',
  'set-speed': '0 1 1 1 1 1 0 0 0 0 0',
  complete: '  0 0 0 0 1 0 0 0 0 0 0',
  finalize: '  0 0 0 0 0 0 0 1 0 0 0',
  dismiss: '   0 0 0 0 0 0 0 0 0 1 0',
};

const row = (s: string) =>
  s
    .trim()
    .split(/\s+/)
    .map((c) => c === '1');

describe('job state tables', () => {
  for (const from of JOB_STATUSES) {
    it(`transitions from ${from}`, () => {
      const want = row(STT[from]);
      const got = JOB_STATUSES.map((to) => transitionAllowed(from, to));
      expect(got).toEqual(want);
    });
  }

  for (const verb of JOB_VERBS) {
    it(`verb ${verb}`, () => {
      const want = row(VERBS[verb]!);
      const got = JOB_STATUSES.map((s) => verbAllowed(verb, s));
      expect(got).toEqual(want);
    });
  }
});
