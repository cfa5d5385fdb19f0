import { QmpError } from './errors';
import { EMPTY_OBJECT, type QObjectType, type QType, type SchemaInfo, SchemaIntrospector } from './schema';
import type { QmpMonitor, QmpServer } from './server';

/** What a command handler gets besides its arguments. */
export interface CommandContext {
  server: QmpServer;
  monitor: QmpMonitor;
}

/** A QMP command: its schema (the one source of validation, introspection and docs) and handler. */
export interface CommandDef<A = any, R = unknown> {
  name: string;
  /** The argument object (default: none accepted). */
  args?: QObjectType;
  /** The return type (default: the empty object). */
  returns?: QType;
  /** One paragraph for the command reference. */
  doc: string;
  /** QAPI features, e.g. ['unstable'] for x- commands. */
  features?: string[];
  /** Requests and replies for the command reference (each request is checked against `args`). */
  examples?: CommandExample[];
  /** Returns the `return` value (undefined means `{}`); throws QmpError / BlockError. */
  handler(args: A, ctx: CommandContext): R | Promise<R>;
}

/** One exchange of the command reference: a request and the server's reply. */
export interface CommandExample {
  /** What the example shows, when a command has more than one. */
  title?: string;
  /** The request's `arguments` (omitted: none). */
  args?: Record<string, unknown>;
  /** The reply's `return` value (omitted: `{}`). */
  returns?: unknown;
  /** An error reply instead of a return. */
  error?: { class: string; desc: string };
}

export interface EventDef {
  name: string;
  data: QObjectType;
  doc: string;
  /** Event data for the command reference (each is checked against `data`). */
  examples?: { title?: string; data: Record<string, unknown> }[];
}

/** The commands and events a server offers. Other packages add theirs with registerCommand. */
export class CommandRegistry {
  private readonly commandMap = new Map<string, CommandDef>();
  private readonly eventMap = new Map<string, EventDef>();

  registerCommand<A, R>(def: CommandDef<A, R>): void {
    if (this.commandMap.has(def.name)) throw new Error(`QMP command '${def.name}' registered twice`);
    this.commandMap.set(def.name, def as CommandDef);
  }

  registerEvent(def: EventDef): void {
    this.eventMap.set(def.name, def);
  }

  command(name: string): CommandDef | undefined {
    return this.commandMap.get(name);
  }

  /** Throws QEMU's CommandNotFound for an unknown name. */
  require(name: string): CommandDef {
    const c = this.commandMap.get(name);
    if (!c) throw new QmpError('CommandNotFound', `The command ${name} has not been found`);
    return c;
  }

  commands(): CommandDef[] {
    return [...this.commandMap.values()];
  }

  events(): EventDef[] {
    return [...this.eventMap.values()];
  }

  /** query-qmp-schema's answer. */
  schema(): SchemaInfo[] {
    const s = new SchemaIntrospector();
    s.ref(EMPTY_OBJECT);
    for (const c of this.commands())
      s.command(c.name, c.args ?? EMPTY_OBJECT, c.returns ?? EMPTY_OBJECT, c.features);
    for (const e of this.events()) s.event(e.name, e.data);
    return s.entries;
  }
}
