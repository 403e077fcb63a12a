/**
 * The panel's link to the server extension: one websocket for events, REST
 * for actions. The only place that parses JSON into the types of types.ts.
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import {
  ClusterEvent,
  EngineState,
  IActor,
  ICluster,
  IClusterState,
  IEngine,
  IGpu,
  IStartRequest
} from './types';

const MIN_RETRY_MS = 500;
const MAX_RETRY_MS = 10000;
const ENGINE_STATES: EngineState[] = ['starting', 'idle', 'busy', 'dead'];

type Json = { [key: string]: unknown };

function isObject(value: unknown): value is Json {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function num(value: unknown, fallback = 0): number {
  return typeof value === 'number' && isFinite(value) ? value : fallback;
}

function numOrNull(value: unknown): number | null {
  return typeof value === 'number' && isFinite(value) ? value : null;
}

function str(value: unknown): string {
  return typeof value === 'string' ? value : '';
}

function list(value: unknown): unknown[] {
  return Array.isArray(value) ? value : [];
}

function parseGpu(value: unknown): IGpu | null {
  if (!isObject(value)) {
    return null;
  }
  return {
    index: num(value.index),
    uuid: str(value.uuid),
    name: str(value.name),
    utilization_percent: numOrNull(value.utilization_percent),
    memory_used_bytes: numOrNull(value.memory_used_bytes),
    memory_total_bytes: numOrNull(value.memory_total_bytes),
    temperature_c: numOrNull(value.temperature_c),
    power_w: numOrNull(value.power_w),
    process_memory_bytes: numOrNull(value.process_memory_bytes)
  };
}

function parseEngine(value: unknown): IEngine | null {
  if (!isObject(value) || typeof value.engine_id !== 'number') {
    return null;
  }
  const state = str(value.state) as EngineState;
  return {
    engine_id: value.engine_id,
    host: str(value.host),
    pid: num(value.pid),
    state: ENGINE_STATES.includes(state) ? state : 'starting',
    task_id: typeof value.task_id === 'string' ? value.task_id : null,
    queued: num(value.queued),
    cpu_percent: numOrNull(value.cpu_percent),
    rss_bytes: numOrNull(value.rss_bytes),
    gpus: list(value.gpus)
      .map(parseGpu)
      .filter((g): g is IGpu => g !== null),
    exit_code: numOrNull(value.exit_code)
  };
}

function parseActor(value: unknown): IActor | null {
  if (!isObject(value)) {
    return null;
  }
  return {
    actor_id: str(value.actor_id),
    class_name: str(value.class_name),
    name: typeof value.name === 'string' ? value.name : null,
    engine_id: numOrNull(value.engine_id),
    pending: num(value.pending),
    calls_done: num(value.calls_done),
    state: value.state ?? null
  };
}

function parseState(value: unknown): IClusterState | null {
  if (!isObject(value) || !Array.isArray(value.engines)) {
    return null;
  }
  const tasks = isObject(value.tasks) ? value.tasks : {};
  return {
    cluster_id: str(value.cluster_id),
    engines: value.engines
      .map(parseEngine)
      .filter((e): e is IEngine => e !== null),
    tasks: {
      pending: num(tasks.pending),
      queued: num(tasks.queued),
      done: num(tasks.done),
      failed: num(tasks.failed)
    },
    actors: list(value.actors)
      .map(parseActor)
      .filter((a): a is IActor => a !== null),
    idle_stop_at: numOrNull(value.idle_stop_at),
    seq: num(value.seq)
  };
}

/**
 * A cluster record from the server, or null if it is not one.
 */
export function parseCluster(value: unknown): ICluster | null {
  if (!isObject(value) || typeof value.cluster_id !== 'string') {
    return null;
  }
  return {
    cluster_id: value.cluster_id,
    host: str(value.host),
    ip: str(value.ip),
    controller_pid: num(value.controller_pid),
    created: num(value.created),
    state: parseState(value.state)
  };
}

/**
 * An event from the events websocket, or null if it is not one.
 */
export function parseEvent(text: string): ClusterEvent | null {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return null;
  }
  if (!isObject(value)) {
    return null;
  }
  if (value.type === 'clusters') {
    return {
      type: 'clusters',
      clusters: list(value.clusters)
        .map(parseCluster)
        .filter((c): c is ICluster => c !== null)
    };
  }
  if (value.type === 'cluster') {
    const cluster = parseCluster(value.cluster);
    return cluster ? { type: 'cluster', cluster } : null;
  }
  if (
    value.type === 'cluster_removed' &&
    typeof value.cluster_id === 'string'
  ) {
    return { type: 'cluster_removed', cluster_id: value.cluster_id };
  }
  return null;
}

/**
 * The events websocket (reconnecting with capped exponential backoff) and the REST verbs.
 */
export class DistConnection {
  constructor(settings?: ServerConnection.ISettings) {
    this._settings = settings ?? ServerConnection.makeSettings();
    this._open();
  }

  /** Each event, parsed. */
  get events(): ISignal<this, ClusterEvent> {
    return this._events;
  }

  /** Whether the websocket is open now. */
  get connectionChanged(): ISignal<this, boolean> {
    return this._connectionChanged;
  }

  get isDisposed(): boolean {
    return this._isDisposed;
  }

  dispose(): void {
    if (this._isDisposed) {
      return;
    }
    this._isDisposed = true;
    if (this._retryTimer !== null) {
      window.clearTimeout(this._retryTimer);
      this._retryTimer = null;
    }
    if (this._socket) {
      this._socket.onclose = null;
      this._socket.close();
      this._socket = null;
    }
    Signal.clearData(this);
  }

  /** Start a local cluster (of CPU or GPU engines); resolves with its id. */
  async startCluster(request: IStartRequest): Promise<string> {
    const reply = await this._request(['clusters'], 'POST', { ...request });
    return str(isObject(reply) ? reply.cluster_id : '');
  }

  /** Stop a cluster and all of its engines. */
  async stopCluster(clusterId: string): Promise<void> {
    await this._request(['clusters', clusterId], 'DELETE');
  }

  /** Replace one engine in place. */
  async restartEngine(clusterId: string, engineId: number): Promise<void> {
    await this._request(
      ['clusters', clusterId, 'engines', String(engineId), 'restart'],
      'POST',
      {}
    );
  }

  private async _request(
    parts: string[],
    method: string,
    body?: Json
  ): Promise<unknown> {
    const url = URLExt.join(this._settings.baseUrl, 'jupyter-dist', ...parts);
    const init: RequestInit = { method };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
    }
    const response = await ServerConnection.makeRequest(
      url,
      init,
      this._settings
    );
    const text = await response.text();
    let value: unknown = null;
    try {
      value = text ? JSON.parse(text) : null;
    } catch {
      value = null;
    }
    if (!response.ok) {
      const message = isObject(value) ? str(value.message) : '';
      throw new Error(message || `${method} ${url}: ${response.status}`);
    }
    return value;
  }

  private _open(): void {
    let url = URLExt.join(this._settings.wsUrl, 'jupyter-dist', 'events');
    const token = this._settings.token;
    if (this._settings.appendToken && token !== '') {
      url += `?token=${encodeURIComponent(token)}`;
    }
    const socket = new this._settings.WebSocket(url);
    this._socket = socket;
    socket.onopen = () => {
      this._retryMs = MIN_RETRY_MS;
      this._connectionChanged.emit(true);
    };
    socket.onmessage = (msg: MessageEvent) => {
      const event = parseEvent(String(msg.data));
      if (event) {
        this._events.emit(event);
      }
    };
    socket.onclose = () => {
      this._socket = null;
      this._connectionChanged.emit(false);
      if (!this._isDisposed) {
        this._retryTimer = window.setTimeout(() => {
          this._retryTimer = null;
          this._open();
        }, this._retryMs);
        this._retryMs = Math.min(this._retryMs * 2, MAX_RETRY_MS);
      }
    };
  }

  private _settings: ServerConnection.ISettings;
  private _socket: WebSocket | null = null;
  private _retryMs = MIN_RETRY_MS;
  private _retryTimer: number | null = null;
  private _isDisposed = false;
  private _events = new Signal<this, ClusterEvent>(this);
  private _connectionChanged = new Signal<this, boolean>(this);
}
