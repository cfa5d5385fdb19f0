import { open } from 'node:fs/promises';
import { BlockError, type BlockGraph, type Errno, errnoText } from '@blockrep/block';
import { Job, type JobManager } from '@blockrep/jobs';
import type { CommandRegistry } from '../registry';
import { opt, type QMembers, type QObjectType, req, t } from '../schema';
import { blockdevTypes } from './blockdev-types';

/** How blockdev-create makes an image for one driver. */
export interface BlockdevCreator {
  driver: string;
  /** The driver's members of BlockdevCreateOptions (besides `driver`). */
  options: QMembers;
  /** Creates the image; throws a BlockError to fail the job with that message. */
  create(options: Record<string, unknown>, ctx: { graph: BlockGraph; job: Job }): Promise<void>;
}

/** The creators blockdev-create knows; driver packages add theirs (qcow2 does). */
export class BlockdevCreators {
  private readonly map = new Map<string, BlockdevCreator>();

  register(c: BlockdevCreator): void {
    this.map.set(c.driver, c);
  }

  get(driver: string): BlockdevCreator | undefined {
    return this.map.get(driver);
  }

  all(): BlockdevCreator[] {
    return [...this.map.values()];
  }
}

/**
 * A job that does one piece of work (blockdev-create, x-blockdev-amend): one unit of progress,
 * concluded until dismissed (as in QEMU).
 */
class OneShotJob extends Job {
  constructor(
    manager: JobManager,
    id: string,
    readonly type: string,
    private readonly work: () => Promise<void>,
  ) {
    super(manager, { id, autoDismiss: false });
  }

  protected async run(): Promise<void> {
    this.progressSetRemaining(1);
    try {
      await this.work();
    } finally {
      this.progressUpdate(1);
    }
  }
}

const PreallocMode = t.enum('PreallocMode', ['off', 'metadata', 'falloc', 'full']);

/** The `file` creator: a file of the given size (preallocated with falloc/full). */
export const fileCreator: BlockdevCreator = {
  driver: 'file',
  options: {
    filename: req(t.str, 'Path of the file to create'),
    size: req(t.size, 'Size in bytes'),
    preallocation: opt(PreallocMode, 'off (sparse, default), falloc or full (written out)'),
    nocow: opt(t.bool, 'Turn off copy-on-write (btrfs; accepted and ignored)'),
    'extent-size-hint': opt(t.size, 'Extent size hint (accepted and ignored)'),
  },
  async create(o) {
    const filename = o.filename as string;
    const size = o.size as number;
    const prealloc = (o.preallocation as string | undefined) ?? 'off';
    if (prealloc === 'metadata') throw new BlockError('Unsupported preallocation mode: metadata');
    let fh: Awaited<ReturnType<typeof open>>;
    try {
      fh = await open(filename, 'w', 0o644);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code as Errno | undefined;
      const text = code && errnoText(code) ? errnoText(code) : (e as Error).message;
      throw new BlockError(`Could not create '${filename}': ${text}`);
    }
    try {
      await fh.truncate(size);
      if (prealloc !== 'off' && size > 0) {
        const chunk = Buffer.alloc(Math.min(size, 1 << 20));
        for (let pos = 0; pos < size; pos += chunk.length) {
          await fh.write(chunk, 0, Math.min(chunk.length, size - pos), pos);
        }
      }
    } catch (e) {
      throw new BlockError(`Could not resize file: ${(e as Error).message}`);
    } finally {
      await fh.close();
    }
  },
};

/** blockdev-create: a job that creates an image with the creator registered for its driver. */
export function registerCreateCommand(
  r: CommandRegistry,
  ctx: { graph: BlockGraph; jobs: JobManager; creators: BlockdevCreators },
): void {
  const { graph, jobs, creators } = ctx;
  const BlockdevCreateOptions: QObjectType = t.union(
    'BlockdevCreateOptions',
    { driver: req(blockdevTypes(graph).driver, 'Block driver to create the image with') },
    'driver',
    () => Object.fromEntries(creators.all().map((c) => [c.driver, c.options])),
    'Options for creating an image',
  );
  r.registerCommand({
    name: 'blockdev-create',
    args: t.object('q_obj_blockdev-create-arg', {
      'job-id': req(t.str, 'Identifier of the new job'),
      options: req(BlockdevCreateOptions, 'What to create'),
    }),
    doc: 'Starts a job that creates an image; the job stays concluded until job-dismiss.',
    examples: [
      {
        args: {
          'job-id': 'create0',
          options: { driver: 'file', filename: '/var/lib/images/disk1.qcow2', size: 0 },
        },
      },
      {
        title: 'A qcow2 image in the file node just created and opened',
        args: { 'job-id': 'create1', options: { driver: 'qcow2', file: 'disk1-file', size: 10737418240 } },
      },
    ],
    handler(a: { 'job-id': string; options: Record<string, unknown> }) {
      const creator = creators.get(a.options.driver as string);
      if (!creator) throw new BlockError('Driver does not support blockdev-create');
      const job: Job = new OneShotJob(jobs, a['job-id'], 'create', () =>
        creator.create(a.options, { graph, job }),
      );
      job.start();
    },
  });

  const LuksAmend: QMembers = {
    state: req(
      t.enum('QCryptoBlockLUKSKeyslotState', ['active', 'inactive']),
      'Whether the keyslot is set or erased',
    ),
    'new-secret': opt(t.str, 'The secret the keyslot gets'),
    'old-secret': opt(t.str, 'The secret of the keyslots to erase'),
    keyslot: opt(t.int, 'The keyslot'),
    'iter-time': opt(t.int, 'Key derivation time, milliseconds'),
    secret: opt(t.str, 'The secret that unlocks the image'),
  };
  const QCryptoBlockAmendOptions = t.union(
    'QCryptoBlockAmendOptions',
    { format: req(t.enum('QCryptoBlockFormat', ['qcow', 'luks']), 'The encryption format') },
    'format',
    () => ({ luks: LuksAmend }),
    'Changes to the encryption of an image',
  );
  const BlockdevAmendOptions = t.union(
    'BlockdevAmendOptions',
    { driver: req(blockdevTypes(graph).driver, 'The driver of the node (it cannot change)') },
    'driver',
    () => ({ qcow2: { encrypt: opt(QCryptoBlockAmendOptions, 'Encryption changes') } }),
    'What to change in an image',
  );
  r.registerCommand({
    name: 'x-blockdev-amend',
    args: t.object('q_obj_x-blockdev-amend-arg', {
      'job-id': req(t.str, 'Identifier of the new job'),
      'node-name': req(t.str, 'The node whose image is changed'),
      options: req(BlockdevAmendOptions, 'The changes'),
      force: opt(t.bool, 'Allow changes QEMU would refuse as unsafe'),
    }),
    features: ['unstable'],
    doc: "Starts a job that changes an open image's options in place. QEMU 7.2 offers only qcow2 encryption changes here; blockrep has no encrypted images, so such a job fails as on an unencrypted image and an empty change succeeds.",
    examples: [{ args: { 'job-id': 'amend0', 'node-name': 'disk0', options: { driver: 'qcow2' } } }],
    handler(a: { 'job-id': string; 'node-name': string; options: { driver: string; encrypt?: unknown } }) {
      const node = graph.lookupBs(undefined, a['node-name']);
      if (node.driver.name !== a.options.driver)
        throw new BlockError("x-blockdev-amend doesn't support changing the block driver");
      if (node.driver.name !== 'qcow2') throw new BlockError('Driver does not support x-blockdev-amend');
      new OneShotJob(jobs, a['job-id'], 'amend', async () => {
        if (a.options.encrypt !== undefined) throw new BlockError("image is not encrypted, can't amend");
      }).start();
    },
  });
}
